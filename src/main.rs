//! The `agentbus` command: run the broker, apply migrations, manage projects.

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use agentbus::config::{ServeArgs, Settings, DEFAULT_DATABASE_URL};
use agentbus::db;
use agentbus::startup::Application;

#[derive(Parser)]
#[command(
    name = "agentbus",
    version,
    about = "A durable real-time message bus for AI agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Serve(ServeArgs),
    /// Create the database if needed and apply pending migrations.
    Migrate(DatabaseArgs),
    /// Manage projects.
    Project {
        #[command(subcommand)]
        command: ProjectCommand,
    },
    /// Manage project tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Measure a broker over real WebSockets and verify every message (docs/PERFORMANCE.md).
    Bench(agentbus::bench::BenchArgs),
}

#[derive(Subcommand)]
enum ProjectCommand {
    /// Create a project and print it as JSON.
    Create {
        /// The project's name.
        name: String,
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Issue a token for a project and print it (shown once).
    Create {
        project_id: uuid::Uuid,
        /// Bind the token to this agent id: it can then only speak as that agent.
        #[arg(long)]
        agent_id: Option<String>,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Revoke a token: new connections and requests with it are refused. (A running broker
    /// closes the sessions using it when the token is revoked through its REST API.)
    Revoke {
        project_id: uuid::Uuid,
        token_id: uuid::Uuid,
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

#[derive(clap::Args)]
struct DatabaseArgs {
    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    database_url: String,
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // The matches are kept: they tell which settings were given by a flag or the environment
    // and which were defaulted, and may come from the configuration file.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Bench(args) => agentbus::bench::run(args),
        Command::Serve(args) => {
            let serve_matches = matches
                .subcommand_matches("serve")
                .expect("the serve subcommand's matches");
            let settings = args.resolve(serve_matches)?;
            actix_web::rt::System::new().block_on(serve(settings))
        }
        Command::Migrate(args) => actix_web::rt::System::new().block_on(async {
            db::ensure_database_exists(&args.database_url).await?;
            db::run_migrations(&args.database_url)?;
            log::info!("migrations are up to date");
            Ok(())
        }),
        Command::Project {
            command: ProjectCommand::Create { name, db: args },
        } => actix_web::rt::System::new().block_on(async {
            db::ensure_database_exists(&args.database_url).await?;
            db::run_migrations(&args.database_url)?;
            let name =
                agentbus::http::validate_project_name(&name).map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut conn =
                <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(
                    &args.database_url,
                )
                .await
                .context("connecting to the database")?;
            let (project, token) = db::queries::create_project_with_token(&mut conn, name).await?;
            let mut shown = serde_json::to_value(&project)?;
            // Shown this once: only its hash is stored.
            shown["token"] = serde_json::json!(token);
            println!("{}", serde_json::to_string_pretty(&shown)?);
            Ok(())
        }),
        Command::Token { command } => actix_web::rt::System::new().block_on(async {
            let args = match &command {
                TokenCommand::Create { db, .. } | TokenCommand::Revoke { db, .. } => db,
            };
            db::ensure_database_exists(&args.database_url).await?;
            db::run_migrations(&args.database_url)?;
            let mut conn =
                <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(
                    &args.database_url,
                )
                .await
                .context("connecting to the database")?;
            match command {
                TokenCommand::Create {
                    project_id,
                    agent_id,
                    ..
                } => {
                    if let Some(agent_id) = &agent_id {
                        agentbus::protocol::check_agent_id("agent_id", agent_id)
                            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
                    }
                    let (id, token) =
                        agentbus::auth::issue(&mut conn, project_id, agent_id.as_deref()).await?;
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&serde_json::json!({
                            "id": id, "project_id": project_id, "agent_id": agent_id, "token": token,
                        }))?
                    );
                }
                TokenCommand::Revoke {
                    project_id,
                    token_id,
                    ..
                } => {
                    if !agentbus::auth::revoke(&mut conn, project_id, token_id).await? {
                        anyhow::bail!("no active token {token_id} in project {project_id}");
                    }
                    println!("revoked {token_id}; new connections with it are refused");
                }
            }
            Ok(())
        }),
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let bind = settings.bind.clone();
    let app = Application::build(settings).await?;
    log::info!("agentbus listening on {bind} (port {})", app.port());
    app.run_until_stopped().await?;
    Ok(())
}
