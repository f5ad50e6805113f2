use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let out = std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo");
    println!("cargo:rerun-if-changed=protos/agent.proto");
    Codegen::new()
        .out_dir(&out)
        .inputs(["protos/agent.proto"])
        .include("protos")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("generate the agent API from protos/agent.proto");
    // `include!` rejects inner attributes; lib.rs applies the same allowances to the modules.
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = std::path::Path::new(&out).join(name);
        let text = std::fs::read_to_string(&path).expect("read generated file");
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("#![") && !l.trim_start().starts_with("//!"))
            .collect();
        std::fs::write(&path, kept.join("\n")).expect("write generated file");
    }
}
