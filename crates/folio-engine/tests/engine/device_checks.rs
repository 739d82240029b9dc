use super::*;

impl Host {
    /// The probe last sent to `session`.
    fn probe_of(&self, session: u64) -> Option<u64> {
        self.sent
            .iter()
            .rev()
            .find_map(|(to, message)| match message.as_ref() {
                ServerMessage::Probe(probe) if to.contains(&session) => Some(probe.id),
                _ => None,
            })
    }
}

#[test]
fn with_device_checks_only_devices_whose_probe_checks_out_are_selected() {
    let mut config = config(strategy_config(2, 2), None);
    config.check_devices = true;
    let mut host = Host::new(
        config,
        Start {
            weights: vec![0.0; PARAMS],
            strategy: None,
            history: Vec::new(),
        },
    );
    let a = host.join("A");
    let b = host.engine.join(join("B"), host.now).unwrap();
    host.run();
    assert!(host.starts().is_empty(), "nobody is checked yet");
    let (probe_a, probe_b) = (host.probe_of(a).unwrap(), host.probe_of(b.session).unwrap());
    assert_ne!(probe_a, probe_b, "each probe is drawn afresh");
    assert!(host.engine.take_probe_answer(a, probe_b).is_err());
    assert!(host.engine.take_probe_answer(a, probe_a).is_ok());
    // A resent answer is refused while the first is checked: one reference
    // computation per probe, however often it is answered.
    for _ in 0..3 {
        let again = host.engine.take_probe_answer(a, probe_a).unwrap_err();
        assert!(
            again.message.contains("answered already"),
            "{}",
            again.message
        );
    }
    host.engine.device_checked(a, probe_a, Ok(()), host.now);
    host.engine.device_checked(
        b.session,
        probe_b,
        Err("its gradient is off".into()),
        host.now,
    );
    host.run();
    assert!(host.starts().is_empty(), "the wrong device is not selected");
    assert!(
        host.errors_to(b.session)
            .iter()
            .any(|e| e.contains("gradient is off"))
    );
    assert!(
        host.engine.take_probe_answer(a, probe_a).is_err(),
        "answered once"
    );
    // The failed device comes back on another backend: checked again, it passes.
    host.leave(b.session);
    let again = CheckedJoin {
        resume: Some(b.token),
        backend: "flex".into(),
        ..join("B")
    };
    host.engine.join(again, host.now).unwrap();
    host.run();
    let probe = host.probe_of(b.session).unwrap();
    assert_ne!(probe, probe_b);
    host.engine
        .device_checked(b.session, probe, Ok(()), host.now);
    host.run();
    assert_eq!(host.selected(), BTreeSet::from([a, b.session]));
    let status = host.engine.status(host.now);
    assert_eq!(status.errors.get("device_check_failed"), Some(&1));
}
