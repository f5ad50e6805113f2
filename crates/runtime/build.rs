fn main() {
    println!("cargo:rerun-if-changed=protos/cache.proto");
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["protos/cache.proto"], &["protos"])
        .expect("generate the VMCache API from protos/cache.proto (needs protoc: apt install protobuf-compiler)");
}
