//! Runs in headless Chromium: `cargo test -p folio-web --target wasm32-unknown-unknown`.
#![cfg(target_arch = "wasm32")]

use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

#[wasm_bindgen_test]
fn vocabulary_round_trips_in_the_browser() {
    let text = "Kent.\nI thought the King had more affected the Duke of Albany";
    let ids = folio_web::encode_text(text);
    assert_eq!(ids.len(), text.len());
    assert_eq!(ids[0], 28, "'K' is id 28 in the tutorial's vocabulary");
    assert_eq!(folio_web::decode_ids(&ids), text);
}

#[wasm_bindgen_test]
async fn browser_offers_a_webgpu_adapter() {
    let adapter = folio_web::webgpu_adapter().await;
    assert!(
        adapter.is_some(),
        "no WebGPU adapter: is Chromium started with the flags in webdriver.json?"
    );
}
