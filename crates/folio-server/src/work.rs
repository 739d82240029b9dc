//! What a new session costs: the proof-of-work bits the server asks of a
//! newcomer ([`folio_proto::work`]). None while there is room (up to four
//! rounds' worth of connected sessions) and the newcomer's allocation holds
//! one session at most; then 8 bits more for each doubling of the sessions
//! competing for places, and 2 for each doubling of the allocation's own. A
//! genuine device pays once a session; a crowd pays for every session it
//! holds, at the rate its own size sets.

/// The bits asked of a newcomer when `connected` sessions compete for rounds of
/// `round_size`, `of_allocation` of them from the newcomer's allocation, and
/// the server asks at most `max_bits` (0: no work is asked).
pub fn join_work_bits(
    connected: usize,
    round_size: usize,
    of_allocation: usize,
    max_bits: u8,
) -> u8 {
    let room = 4 * round_size.max(1);
    let from_load = if connected <= room {
        0
    } else {
        (8.0 * (connected as f64 / room as f64).log2()).floor() as u32
    };
    let from_crowd = match of_allocation {
        0 | 1 => 0,
        n => 2 * n.ilog2(),
    };
    (from_load + from_crowd).min(u32::from(max_bits.min(folio_proto::work::MAX_BITS))) as u8
}

#[cfg(test)]
mod tests {
    use super::join_work_bits;

    #[test]
    fn work_grows_with_the_crowd_competing_and_the_allocation_s_own() {
        // Rounds of 10: up to 40 sessions and one per allocation, nothing.
        assert_eq!(join_work_bits(40, 10, 1, 22), 0);
        // Three of one /24 already: 2 bits.
        assert_eq!(join_work_bits(40, 10, 3, 22), 2);
        // 80 and 160 sessions for rounds of 10: 8 and 16 bits.
        assert_eq!(join_work_bits(80, 10, 0, 22), 8);
        assert_eq!(join_work_bits(160, 10, 1, 22), 16);
        // 300 sessions over 100 networks (3 each): the 22-bit cap.
        assert_eq!(join_work_bits(300, 10, 3, 22), 22);
        // Off.
        assert_eq!(join_work_bits(300, 10, 3, 0), 0);
    }
}
