//! The whole NBD handshake, driven by arbitrary client bytes over an
//! in-memory pipe: it ends (transmission, abort or error) without panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rvol_frontend::nbd::handshake::{negotiate, ExportInfo};
use tokio::io::AsyncWriteExt;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        client.write_all(data).await.unwrap();
        drop(client.shutdown().await);
        let export = ExportInfo {
            name: "vol".into(),
            description: "fuzz".into(),
            size: 1 << 20,
            transmission_flags: 1,
        };
        let _ = negotiate(&mut server, &export).await;
    });
});
