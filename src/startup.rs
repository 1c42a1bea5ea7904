//! Building and running a broker. `Application::build` prepares everything and binds the
//! listener (port 0 picks a free port, which is how tests run many brokers at once);
//! `run_until_stopped` serves until the server is stopped.

use std::net::TcpListener;
use std::sync::Arc;

use actix::{Actor, Arbiter};
use actix_web::dev::{Server, ServerHandle};
use actix_web::{web, App, HttpServer};
use anyhow::Context;

use crate::actors::cursor::CursorActor;
use crate::actors::deadlines::{AttachPersistence, DeadlineActor};
use crate::actors::persistence::PersistenceActor;
use crate::actors::registry::ChannelRegistry;
use crate::config::Settings;
use crate::db;
use crate::http::{self, AppState};
use crate::stats::Stats;

pub struct Application {
    port: u16,
    server: Server,
    /// Runs the channel and persistence actors, apart from the HTTP workers.
    broker_arbiter: Arbiter,
}

impl Application {
    /// Creates the database if needed, applies migrations, starts the actors and binds.
    /// Must be called inside an actix system.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        db::ensure_database_exists(&settings.database_url).await?;
        db::run_migrations(&settings.database_url)?;
        let pool = db::build_pool(
            &settings.database_url,
            settings.db_pool_size,
            settings.db_timeout(),
        )?;

        let broker_arbiter = Arbiter::new();
        let stats = Stats::default();
        let registry = ChannelRegistry::new(broker_arbiter.handle(), stats.clone());
        let deadlines = {
            let pool = pool.clone();
            DeadlineActor::start_in_arbiter(&broker_arbiter.handle(), move |_| {
                DeadlineActor::new(pool)
            })
        };
        let persistence = {
            let (pool, registry, deadlines, stats) = (
                pool.clone(),
                registry.clone(),
                deadlines.clone(),
                stats.clone(),
            );
            let batch_max_rows = settings.batch_max_rows;
            PersistenceActor::start_in_arbiter(&broker_arbiter.handle(), move |_| {
                PersistenceActor::new(pool, registry, deadlines, stats, batch_max_rows)
            })
        };
        deadlines.do_send(AttachPersistence(persistence.clone()));
        let cursors = {
            let pool = pool.clone();
            CursorActor::start_in_arbiter(&broker_arbiter.handle(), move |_| CursorActor::new(pool))
        };

        let listener = TcpListener::bind(&settings.bind)
            .with_context(|| format!("binding {}", settings.bind))?;
        let port = listener.local_addr()?.port();
        let workers = match settings.workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let state = AppState {
            pool,
            settings: Arc::new(settings),
            registry,
            persistence,
            cursors,
            stats,
        };
        let server = HttpServer::new(move || {
            App::new()
                .app_data(web::Data::new(state.clone()))
                .configure(http::routes)
        })
        .workers(workers)
        .listen(listener)?
        .run();
        Ok(Application {
            port,
            server,
            broker_arbiter,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A handle to stop the server from elsewhere.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let result = self.server.await;
        self.broker_arbiter.stop();
        result
    }
}
