fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protoc comes from the vendored crate so a fresh machine needs no apt step.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Replicated state is encoded by every member: maps in a stable order.
        .btree_map(".granary.v1.MountPoint")
        .compile_protos(
            &[
                "proto/granary.proto",
                "proto/data.proto",
                "proto/raft.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
