// Generates the Rust types for protos containerd-shim-protos does not carry, with the pure-Rust
// parser: no protoc is needed to build the shim.
use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("protos");
    fs::create_dir_all(&out).expect("create OUT_DIR/protos");
    protobuf_codegen::Codegen::new()
        .pure()
        .include("proto")
        .input("proto/runtimeoptions.proto")
        .out_dir(&out)
        .run_from_script();
    // The generated file starts with inner attributes, which `include!` inside
    // a module does not accept: the module in lib.rs carries them instead.
    let file = out.join("runtimeoptions.rs");
    let text = fs::read_to_string(&file).expect("read generated runtimeoptions.rs");
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("#![") && !l.starts_with("//!"))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(&file, text).expect("write generated runtimeoptions.rs");
    println!("cargo:rerun-if-changed=proto/runtimeoptions.proto");
}
