//! WebGPU in the page: its adapter and burn's device on it.

use std::cell::RefCell;

use burn::prelude::Device;
use js_sys::{Function, Promise, Reflect};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;

/// Describes the browser's WebGPU adapter (`vendor architecture`), or `None` when
/// the browser has no WebGPU or no adapter (the CPU fallback then trains).
#[wasm_bindgen(js_name = webgpuAdapter)]
pub async fn webgpu_adapter() -> Option<String> {
    let navigator = Reflect::get(&js_sys::global(), &"navigator".into()).ok()?;
    let gpu = Reflect::get(&navigator, &"gpu".into()).ok()?;
    if gpu.is_undefined() {
        return None;
    }
    let request: Function = Reflect::get(&gpu, &"requestAdapter".into())
        .ok()?
        .dyn_into()
        .ok()?;
    let promise: Promise = request.call0(&gpu).ok()?.dyn_into().ok()?;
    let adapter = JsFuture::from(promise).await.ok()?;
    if adapter.is_null() || adapter.is_undefined() {
        return None;
    }
    let info = Reflect::get(&adapter, &"info".into()).ok()?;
    let field = |name: &str| {
        Reflect::get(&info, &name.into())
            .ok()
            .and_then(|v| v.as_string())
            .unwrap_or_default()
    };
    Some(
        format!("{} {}", field("vendor"), field("architecture"))
            .trim()
            .to_owned(),
    )
}

thread_local! {
    /// A page can register WebGPU with burn once: every caller shares the device.
    static WEBGPU: RefCell<Option<Device>> = const { RefCell::new(None) };
}

/// burn's WebGPU device, initialised on first use (async, as browsers require).
pub async fn webgpu_device() -> Result<Device, String> {
    if let Some(device) = WEBGPU.with(|cell| cell.borrow().clone()) {
        return Ok(device);
    }
    let device = Device::wgpu_options()
        .init_async()
        .await
        .map_err(|err| format!("WebGPU initialisation failed: {err:?}"))?;
    WEBGPU.with(|cell| *cell.borrow_mut() = Some(device.clone()));
    Ok(device)
}
