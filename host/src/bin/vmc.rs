//! `vmc`: the command-line client of the host agent's JSON API. A placeholder until
//! the API lands: it prints its version and exits.

fn main() {
    println!(
        "vmc {}: the command-line client is not built yet",
        vmc_host::VERSION
    );
}
