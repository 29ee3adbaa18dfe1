//! NBD request headers and option payloads on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rvol_frontend::nbd::handshake::{parse_info_request, parse_meta_request};
use rvol_frontend::nbd::proto::{Request, REQUEST_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = <&[u8; REQUEST_LEN]>::try_from(data.get(..REQUEST_LEN).unwrap_or(&[])) {
        if let Ok(r) = Request::parse(b) {
            assert_eq!(&r.encode(), b);
        }
    }
    let _ = parse_info_request(data);
    let _ = parse_meta_request(data);
});
