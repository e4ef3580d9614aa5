//! `vmc-host`: the host agent service. A placeholder until the engine lands: it
//! prints its version and the protocol version it speaks, and exits.

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    println!(
        "vmc-host {} (protocol {}): the host agent engine is not built yet",
        vmc_host::VERSION,
        vmc_host::protocol::PROTOCOL_VERSION
    );
}
