//! `vmc-guest`: the guest agent. A placeholder until the agent lands: it prints its
//! version and the protocol version it speaks, and exits.

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    println!(
        "vmc-guest {} (protocol {}): the guest agent is not built yet",
        vmc_guest::VERSION,
        vmc_guest::protocol::PROTOCOL_VERSION
    );
}
