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
        .compile_fds(fds)?;
    Ok(())
}
