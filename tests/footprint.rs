//! What an idle connection costs is what decides how many phones a node holds
//! (BENCHMARKS.md, "Idle memory"). tokio keeps a task in one block rounded up to 128 bytes,
//! with 104 bytes of its own around the future (header, scheduler, id, stage tag, trailer),
//! so a connection's future of at most 280 bytes takes a 384-byte block; 8 more bytes and
//! every connection pays 128 more. (272 bytes in a release build, 280 in a debug one.)

use std::sync::Arc;

use herald::auth::Auth;
use herald::broker::Broker;
use herald::config::Config;
use herald::outbox::Store;
use herald::session::Connection;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn an_idle_connections_task_fits_a_384_byte_block() {
    let config = Config::default();
    let auth = Arc::new(Auth::load(&config).expect("no auth configured"));
    let broker = Arc::new(
        Broker::open(
            config.clone(),
            Store::open(&config, None, "test"),
            None,
            auth,
        )
        .await
        .expect("memory store"),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (stream, peer) = listener.accept().await.unwrap();
    // The server's guard is one pointer too.
    let guard = Arc::new(());
    let task = Connection::new(broker, stream, peer, CancellationToken::new()).run(guard);
    let size = std::mem::size_of_val(&task);
    assert!(
        size <= 280,
        "a connection's future is {size} bytes: over 280, tokio's block grows from 384 to 512 bytes per connection"
    );
}
