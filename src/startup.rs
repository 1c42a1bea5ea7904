//! Building and running a broker. `Application::build` prepares everything and binds the
//! listener (port 0 picks a free port, which is how tests run many brokers at once);
//! `run_until_stopped` serves until the server is stopped.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Arbiter};
use actix_web::dev::{Server, ServerHandle};
use actix_web::{web, App, HttpServer};
use anyhow::Context;

use crate::actors::channel::{ClusterLink, DrainAll, Presence};
use crate::actors::cluster::{self, ClusterActor, NodeConfig};
use crate::actors::cursor::CursorActor;
use crate::actors::deadlines::DeadlineActor;
use crate::actors::persistence::PersistenceActor;
use crate::actors::registry::ChannelRegistry;
use crate::actors::search::SearchIndexActor;
use crate::config::Settings;
use crate::db;
use crate::http::{self, AppState};
use crate::stats::Stats;
use actix::AsyncContext;

pub struct Application {
    port: u16,
    server: Server,
    /// Runs the channel and persistence actors, apart from the HTTP workers.
    broker_arbiter: Arbiter,
    /// For the graceful shutdown: the channels to drain, and the sessions to mark closed.
    registry: ChannelRegistry,
    pool: db::DbPool,
    shutdown_timeout: Duration,
    /// This broker's id among the brokers sharing its database.
    node_id: String,
    /// Runs the cluster actor: its heartbeat keeps its own thread, whatever the load.
    cluster_arbiter: Arbiter,
}

impl Application {
    /// Creates the database if needed, applies migrations, starts the actors and binds.
    /// Must be called inside an actix system.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let admin_token = settings.admin_token.as_deref().filter(|t| !t.is_empty());
        if admin_token.is_some_and(|t| t.chars().count() < crate::auth::MIN_ADMIN_TOKEN_CHARS) {
            anyhow::bail!(
                "the admin token is too short: use at least {} characters (e.g. `openssl rand -hex 32`)",
                crate::auth::MIN_ADMIN_TOKEN_CHARS
            );
        }
        if admin_token.is_none() && !crate::auth::is_loopback_bind(&settings.bind) {
            anyhow::bail!(
                "refusing to listen on {} without an admin token: anyone who can reach it could \
                 read and write every project. Set AGENTBUS_ADMIN_TOKEN (or --admin-token), or bind \
                 to 127.0.0.1",
                settings.bind
            );
        }
        let node_id = match &settings.node_id {
            Some(id) => id.clone(),
            None => cluster::generated_node_id(),
        };
        cluster::check_node_id(&node_id)?;
        if settings.node_timeout_ms < 2 * settings.node_heartbeat_ms.max(1) {
            anyhow::bail!(
                "node_timeout_ms ({}) must be at least twice node_heartbeat_ms ({}): a node \
                 would otherwise be declared dead between two of its own heartbeats",
                settings.node_timeout_ms,
                settings.node_heartbeat_ms
            );
        }
        db::ensure_database_exists(&settings.database_url).await?;
        db::run_migrations(&settings.database_url)?;
        let pool = db::build_pool(
            &settings.database_url,
            settings.db_pool_size,
            settings.db_timeout(),
        )?;

        let broker_arbiter = Arbiter::new();
        let stats = Stats::default();
        let link = ClusterLink::new(node_id.clone(), pool.clone());
        let registry =
            ChannelRegistry::new(broker_arbiter.handle(), stats.clone()).clustered(link.clone());
        let search = {
            let pool = pool.clone();
            SearchIndexActor::start_in_arbiter(&broker_arbiter.handle(), move |_| {
                SearchIndexActor::new(pool)
            })
        };
        // The persistence actor sends to the deadline and coordination actors, and they send
        // to it: both are started from the persistence actor's start-up, with its address, so
        // all three are built complete and none waits to be wired.
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let persistence = {
            let (pool, registry, stats) = (pool.clone(), registry.clone(), stats.clone());
            let batch_max_rows = settings.batch_max_rows;
            let commit_lanes = settings.commit_lanes.clamp(1, 16);
            let max_uncommitted_bytes = settings.max_uncommitted_bytes;
            let db_timeout = settings.db_timeout();
            let (search, node_id) = (search.clone(), node_id.clone());
            let peers = Arc::clone(&link.peers);
            PersistenceActor::start_in_arbiter(&broker_arbiter.handle(), move |ctx| {
                let deadlines = DeadlineActor::new(pool.clone(), ctx.address().recipient()).start();
                let coordination = crate::actors::coordination::CoordinationActor::new(
                    pool.clone(),
                    ctx.address().recipient(),
                    db_timeout,
                )
                .start();
                let _ = started_tx.send((deadlines.clone(), coordination.clone()));
                PersistenceActor::new(
                    pool,
                    registry,
                    crate::actors::persistence::FollowUps {
                        requests: deadlines.recipient(),
                        search: search.recipient(),
                        tasks: coordination.recipient(),
                    },
                    stats,
                    batch_max_rows,
                    max_uncommitted_bytes,
                    commit_lanes,
                )
                .on_node(node_id, peers)
            })
        };
        let (deadlines, coordination_actor) = started_rx
            .await
            .context("the deadline and coordination actors did not start")?;
        let coordination = crate::actors::coordination::Coordination::new(
            pool.clone(),
            persistence.clone().recipient(),
            coordination_actor.clone(),
            settings.claim_limits(),
            settings.db_timeout(),
        );
        let persistence = persistence.recipient();
        let cursors = {
            let pool = pool.clone();
            CursorActor::start_in_arbiter(&broker_arbiter.handle(), move |_| CursorActor::new(pool))
        };

        let listener = TcpListener::bind(&settings.bind)
            .with_context(|| format!("binding {}", settings.bind))?;
        let port = listener.local_addr()?.port();
        // Registered before the first connection is accepted: sessions are recorded as this
        // node's.
        let node = NodeConfig {
            node_id: node_id.clone(),
            address: match settings.bind.rsplit_once(':') {
                Some((host, _)) => format!("{host}:{port}"),
                None => settings.bind.clone(),
            },
            database_url: settings.database_url.clone(),
            heartbeat: Duration::from_millis(settings.node_heartbeat_ms.max(1)),
            timeout: Duration::from_millis(settings.node_timeout_ms),
        };
        let peers = cluster::register(&pool, &node).await?;
        link.peers
            .store(peers, std::sync::atomic::Ordering::Relaxed);
        log::info!("node {node_id} joined the cluster at {}", node.address);
        let cluster_arbiter = Arbiter::new();
        {
            let registry = registry.clone();
            ClusterActor::start_in_arbiter(&cluster_arbiter.handle(), move |_| {
                ClusterActor::new(
                    node,
                    link.peers,
                    registry,
                    deadlines.clone().recipient(),
                    vec![deadlines.recipient(), coordination_actor.recipient()],
                    search.clone().recipient(),
                    search.recipient(),
                )
            });
        }
        let workers = match settings.workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let shutdown_timeout = Duration::from_millis(settings.shutdown_timeout_ms.max(1));
        let (shutdown_registry, shutdown_pool) = (registry.clone(), pool.clone());
        let project_limits = crate::limits::ProjectLimits::new(
            settings.rate_per_project,
            settings.burst_per_project,
        );
        let connection_limits = crate::limits::ConnectionLimits::new(
            settings.max_connections_per_project,
            settings.max_connections_per_address,
        );
        let inbox_waits = crate::actors::inbox::WaitLimits::new(
            settings.max_inbox_waits,
            settings.max_inbox_waits_per_project,
            stats.metrics().inbox_waits(),
        );
        let settings = Arc::new(settings);
        let state = AppState {
            pool,
            settings: Arc::clone(&settings),
            registry,
            persistence,
            cursors,
            stats,
            project_limits,
            connection_limits,
            inbox_waits,
            waiters: http::guards::Waiters::new(
                settings.max_waiters_per_project,
                settings.max_waiters,
            ),
            heavy_reads: http::guards::HeavyReads::new(
                settings.max_heavy_reads,
                Duration::from_millis(settings.heavy_read_wait_ms),
            ),
            mcp_sessions: http::McpSessions::default(),
            coordination,
        };
        let server = HttpServer::new(move || {
            App::new()
                .wrap(actix_web::middleware::from_fn(http::guards::bound_body))
                .wrap(actix_web::middleware::from_fn(http::guards::refuse_nul))
                .wrap(actix_web::middleware::from_fn(http::log_request))
                // Every response, errors and the console included: browsers must not guess
                // a content type other than the one given.
                .wrap(
                    actix_web::middleware::DefaultHeaders::new()
                        .add((actix_web::http::header::X_CONTENT_TYPE_OPTIONS, "nosniff")),
                )
                .app_data(web::Data::new(state.clone()))
                .configure(http::routes)
        })
        .workers(workers)
        // Frames are small and written as soon as they are ready: with Nagle's algorithm a
        // receipt or delivery waits for the client's (delayed) ACK of the previous frame,
        // which held light-load latency at 20-40 ms (docs/PERFORMANCE.md, third round).
        .tcp_nodelay(true)
        // A client that closes its connection while its request is pending (typically a
        // `POST .../requests` waiting for a reply) ends the request: its handler is dropped
        // and the socket closed, instead of both waiting for the reply timeout.
        .h1_allow_half_closed(false)
        // Signals are handled by `run_until_stopped`, which drains sessions first.
        .disable_signals()
        .shutdown_timeout(shutdown_timeout.as_secs().max(1))
        .listen(listener)?
        .run();
        Ok(Application {
            port,
            server,
            broker_arbiter,
            registry: shutdown_registry,
            pool: shutdown_pool,
            shutdown_timeout,
            node_id,
            cluster_arbiter,
        })
    }

    /// This broker's id among the brokers sharing its database.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A handle to stop the server from elsewhere.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until the server is stopped (through its handle) or the process gets SIGTERM
    /// or SIGINT, which shut down gracefully: stop accepting connections, let every session
    /// settle the sends it has (commit, receipt), close the sockets with 1001, mark sessions
    /// disconnected, and return, all within `shutdown_timeout`.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let handle = self.server.handle();
        let (registry, pool, timeout) = (self.registry, self.pool, self.shutdown_timeout);
        let (leave_pool, node_id) = (pool.clone(), self.node_id.clone());
        let shutdown_node = node_id.clone();
        actix_web::rt::spawn(async move {
            if shutdown_signal().await.is_err() {
                return;
            }
            log::info!("shutting down: draining sessions (at most {timeout:?})");
            handle.pause().await;
            let deadline = tokio::time::Instant::now() + timeout;
            drain(&registry, deadline).await;
            // This node's sessions are marked disconnected, its duties handed over.
            cluster::leave(&pool, &shutdown_node).await;
            handle.stop(true).await;
        });
        let result = self.server.await;
        // Also when stopped through the handle: the other nodes take over at once rather than
        // after this node's timeout.
        self.cluster_arbiter.stop();
        cluster::leave(&leave_pool, &node_id).await;
        self.broker_arbiter.stop();
        result
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        result = tokio::signal::ctrl_c() => result?,
    }
    Ok(())
}

/// Tells every session to settle and close, then waits until none is left or the deadline.
async fn drain(registry: &ChannelRegistry, deadline: tokio::time::Instant) {
    for channel in registry.all() {
        let _ = channel.send(DrainAll).await;
    }
    while tokio::time::Instant::now() < deadline {
        let mut open = 0;
        for channel in registry.all() {
            open += channel.send(Presence).await.map(|p| p.len()).unwrap_or(0);
        }
        if open == 0 {
            log::info!("all sessions closed");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    log::warn!("shutdown deadline reached with sessions still open");
}
