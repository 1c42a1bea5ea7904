//! The `agentbus` command: run the broker, apply migrations, manage projects, and the agent
//! commands (`send`, `inbox`, `ask`, ...) that talk to a running broker over HTTP.

use std::process::ExitCode;

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
    #[command(flatten)]
    Agent(agentbus::cli::AgentCommand),
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
    /// List the projects of a running broker (needs the admin token on a protected broker).
    List(agentbus::cli::ListArgs),
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

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // The matches are kept: they tell which settings were given by a flag or the environment
    // and which were defaulted, and may come from the configuration file.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Agent(command) => agentbus::cli::run(command),
        Command::Project {
            command: ProjectCommand::List(args),
        } => agentbus::cli::list_projects(args),
        command => match administer(command, &matches) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                // One line, the causes after colons; never a backtrace.
                eprintln!("agentbus: {e:#}");
                ExitCode::from(agentbus::cli::error::exit::ERROR)
            }
        },
    }
}

/// The commands that run the broker or work on its database directly.
fn administer(command: Command, matches: &clap::ArgMatches) -> anyhow::Result<()> {
    match command {
        Command::Agent(_)
        | Command::Project {
            command: ProjectCommand::List(_),
        } => unreachable!("handled by main"),
        Command::Bench(args) => agentbus::bench::run(args),
        Command::Serve(args) => {
            let serve_matches = matches
                .subcommand_matches("serve")
                .context("the serve subcommand's settings")?;
            let settings = args.resolve(serve_matches)?;
            actix_web::rt::System::new().block_on(serve(settings))
        }
        Command::Migrate(args) => actix_web::rt::System::new().block_on(async {
            prepare(&args.database_url).await?;
            log::info!("migrations are up to date");
            Ok(())
        }),
        Command::Project {
            command: ProjectCommand::Create { name, db: args },
        } => actix_web::rt::System::new().block_on(async {
            prepare(&args.database_url).await?;
            let name =
                agentbus::http::validate_project_name(&name).map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut conn = connect(&args.database_url).await?;
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
            prepare(&args.database_url).await?;
            let mut conn = connect(&args.database_url).await?;
            match command {
                TokenCommand::Create {
                    project_id,
                    agent_id,
                    ..
                } => {
                    let agent_id = agent_id
                        .map(|id| agentbus::domain::AgentId::parse("agent_id", id))
                        .transpose()
                        .map_err(|e| anyhow::anyhow!("{}", e.0))?;
                    if db::queries::find_project(&mut conn, project_id)
                        .await
                        .context("looking up the project")?
                        .is_none()
                    {
                        anyhow::bail!(
                            "no project {project_id} in this database; see `agentbus project list` or create one with `agentbus project create NAME`"
                        );
                    }
                    let (id, token) =
                        agentbus::db::tokens::issue(&mut conn, project_id, agent_id.as_deref()).await?;
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
                    if !agentbus::db::tokens::revoke(&mut conn, project_id, token_id).await? {
                        anyhow::bail!("no active token {token_id} in project {project_id}");
                    }
                    println!("revoked {token_id}; new connections with it are refused");
                }
            }
            Ok(())
        }),
    }
}

/// Creates the database if needed and applies pending migrations; an error says what to
/// fix first.
async fn prepare(database_url: &str) -> anyhow::Result<()> {
    let fix = || -> String {
        format!(
            "the database at {} is not usable; start PostgreSQL or set DATABASE_URL (--database-url)",
            redact(database_url)
        )
    };
    // The root cause only: the outer layers repeat the URL, with its password.
    let explain = |e: anyhow::Error| anyhow::anyhow!("{}: {}", fix(), e.root_cause());
    db::ensure_database_exists(database_url)
        .await
        .map_err(explain)?;
    db::run_migrations(database_url).map_err(explain)
}

/// A connection to the database, or an error that says where it was looked for.
async fn connect(database_url: &str) -> anyhow::Result<diesel_async::AsyncPgConnection> {
    <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(database_url)
        .await
        .with_context(|| {
            format!(
                "cannot connect to the database at {}; start PostgreSQL or set DATABASE_URL (--database-url)",
                redact(database_url)
            )
        })
}

/// A database URL without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let bind = settings.bind.clone();
    let app = Application::build(settings).await?;
    log::info!("agentbus listening on {bind} (port {})", app.port());
    announce_listening(&bind, app.port())?;
    app.run_until_stopped().await?;
    Ok(())
}

/// Writes [`protocol::Listening`]'s line to standard output.
fn announce_listening(bind: &str, port: u16) -> anyhow::Result<()> {
    use std::io::Write;
    let line = serde_json::to_string(&agentbus::protocol::Listening::new(bind, port))?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    Ok(())
}
