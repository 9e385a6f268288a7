//! Compiles the broker's contract from `proto/` (a symlink to the workspace's `proto/`, so there is
//! one copy of the .proto files and the packaged crate still carries them) with protox: pure Rust,
//! no `protoc` needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        ["proxybroker/v1/broker.proto", "proxybroker/v1/admin.proto"],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        .build_server(false)
        // Messages that carry proxy URLs (credentials included) get a hand-written `Debug` that
        // masks them (`src/resolve.rs`, `src/feedback.rs`).
        .skip_debug(["proxybroker.v1.ProxyResponse", "proxybroker.v1.ProxyFeedback"])
        .compile_fds(fds)?;
    Ok(())
}
