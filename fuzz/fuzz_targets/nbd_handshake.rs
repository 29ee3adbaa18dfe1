//! The whole NBD handshake, driven by arbitrary client bytes over an
//! in-memory pipe: it ends (transmission, abort or error) without panic,
//! both on a server without TLS and on one that requires it (where it
//! must never reach transmission without STARTTLS).
#![no_main]
use libfuzzer_sys::fuzz_target;
use rvol_frontend::nbd::handshake::{greet, negotiate, options, ExportInfo, Outcome, Tls};
use tokio::io::AsyncWriteExt;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let export = ExportInfo {
            name: "vol".into(),
            description: "fuzz".into(),
            size: 1 << 20,
            transmission_flags: 1,
        };
        for tls in [false, true] {
            let (mut client, mut server) = tokio::io::duplex(1 << 20);
            client.write_all(data).await.unwrap();
            drop(client.shutdown().await);
            if !tls {
                let _ = negotiate(&mut server, &export).await;
                continue;
            }
            if let Ok(g) = greet(&mut server).await {
                let outcome = options(&mut server, &export, g, Tls::Required).await;
                assert!(!matches!(outcome, Ok(Outcome::Serve(_))), "served without TLS");
            }
        }
    });
});
