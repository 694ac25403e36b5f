//! A real S3 endpoint for tests of the object store adapter: s3s serving the S3 protocol over HTTP on a local
//! port, from files (s3s-fs), reached through `object_store`'s S3 client as AWS would be. Shared by the unit
//! tests of `src/io.rs` and by `tests/real_hosts.rs`.

/// An S3 endpoint on a local port: s3s serving the S3 protocol over HTTP from files under `root`, with one
/// bucket, `backups`, and signed requests (key `lockstep`, secret `lockstep-secret`). It serves on a thread
/// of its own until the test process ends. Returns the endpoint's URL.
pub fn serve(root: &std::path::Path) -> String {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    std::fs::create_dir_all(root.join("backups")).unwrap();
    let mut builder = s3s::service::S3ServiceBuilder::new(s3s_fs::FileSystem::new(root).unwrap());
    builder.set_auth(s3s::auth::SimpleAuth::from_single("lockstep", "lockstep-secret"));
    let service = builder.build().into_shared();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            while let Ok((socket, _)) = listener.accept().await {
                let connection = server.serve_connection(TokioIo::new(socket), service.clone()).into_owned();
                tokio::spawn(connection);
            }
        });
    });
    format!("http://{addr}")
}

/// `object_store`'s S3 client for the bucket of [`serve`] at `endpoint`.
pub fn client(endpoint: &str) -> object_store::aws::AmazonS3 {
    object_store::aws::AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_bucket_name("backups")
        .with_access_key_id("lockstep")
        .with_secret_access_key("lockstep-secret")
        .build()
        .unwrap()
}
