//! Compiles `proto/` with protox (pure Rust: no `protoc` needed) and writes the descriptor set that
//! server reflection serves.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        ["proxybroker/v1/broker.proto", "proxybroker/v1/admin.proto"],
        ["proto"],
    )?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("proxybroker_descriptor.bin"), fds.encode_to_vec())?;
    // Small encode buffers: a WatchProxy stream keeps its buffer for as long as it is open
    // (src/codec.rs).
    tonic_prost_build::configure()
        .codec_path("crate::codec::ProstCodec")
        .compile_fds(fds.clone())?;
    // The feed service once more, on its own: the server side of `ProxyBroker` answers with
    // `crate::wire::ProxyAnswer` (a `ProxyResponse` on the wire that a cache hit sends from bytes
    // encoded once per entry, src/wire.rs) and takes `crate::wire::ProxyQuery` as its
    // `ProxyRequest` (short strings held inline, src/wire/query.rs); every other message type is
    // the one generated above.
    let mut server_only = fds;
    for file in &mut server_only.file {
        file.service.retain(|s| s.name() == "ProxyBroker");
    }
    let server_dir = out.join("wire_server");
    std::fs::create_dir_all(&server_dir)?;
    tonic_prost_build::configure()
        .build_client(false)
        .out_dir(&server_dir)
        .codec_path("crate::codec::ProstCodec")
        .extern_path(".proxybroker.v1.ProxyResponse", "crate::wire::ProxyAnswer")
        .extern_path(".proxybroker.v1.ProxyRequest", "crate::wire::ProxyQuery")
        .extern_path(".proxybroker.v1", "crate::pb")
        .compile_fds(server_only)?;
    Ok(())
}
