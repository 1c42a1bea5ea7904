//! Rebuilds the broker when a migration is added: `embed_migrations!` reads the directory at
//! compile time, and without this Cargo would not notice a new one.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
