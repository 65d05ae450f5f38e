//! Compiles the gRPC messages of `proto/grpc_service.proto` (prost, with protox: no protoc).

fn main() {
    println!("cargo:rerun-if-changed=proto/grpc_service.proto");
    let descriptors =
        protox::compile(["proto/grpc_service.proto"], ["proto"]).expect("proto/grpc_service.proto compiles");
    prost_build::Config::new()
        .compile_fds(descriptors)
        .expect("prost generates the gRPC messages");
}
