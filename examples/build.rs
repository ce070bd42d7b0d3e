//! Generates the `greeter` example's gRPC service code with tonic-build's
//! `manual` mode: the service is described here in Rust and its messages
//! are hand-written prost types (`src/bin/greeter.rs`), so the build needs
//! no `.proto` file and no `protoc`. It writes only into `OUT_DIR`.

fn main() {
    let method = |name: &str, route: &str, input: &str| {
        tonic_build::manual::Method::builder()
            .name(name)
            .route_name(route)
            .input_type(format!("crate::{input}"))
            .output_type("crate::HelloReply")
            .codec_path("tonic::codec::ProstCodec")
    };
    let greeter = tonic_build::manual::Service::builder()
        .name("Greeter")
        .package("greeter")
        .method(method("say_hello", "SayHello", "HelloRequest").build())
        .method(
            method("say_hello_stream", "SayHelloStream", "StreamRequest")
                .server_streaming()
                .build(),
        )
        .build();
    tonic_build::manual::Builder::new()
        .build_client(false)
        .compile(&[greeter]);
}
