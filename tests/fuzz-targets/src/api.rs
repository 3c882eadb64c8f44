//! The REST API's request bodies and the VM configuration (JSON and command-line options).

use api_server::config::{self, VmConfig};
use api_server::server::parse_route_body;
use api_server::ROUTES;

/// An API request body: byte 0 picks the endpoint (`ROUTES`), the rest is the body, parsed as
/// the server does (JSON, serde models, the models' checks, the OpenAPI schema).
pub fn request(data: &[u8]) {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let route = &ROUTES[usize::from(pick) % ROUTES.len()];
    let _ = parse_route_body(route, body);
}

/// A VM configuration: byte 0 picks the parser, the rest is its input. 0: the JSON `VmConfig`
/// (`vm.create`'s body, validated), 1 to 11: one command-line option's value.
pub fn vm_config(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    if pick % 12 == 0 {
        if let Ok(cfg) = serde_json::from_slice::<VmConfig>(rest) {
            let _ = cfg.validate();
            let _ = cfg.devices();
            let _ = cfg.effective_cmdline();
            let _ = serde_json::to_vec(&cfg);
        }
        return;
    }
    // Command-line arguments reach the parsers as UTF-8 (clap rejects anything else).
    let Ok(s) = std::str::from_utf8(rest) else {
        return;
    };
    let _ = match pick % 12 {
        1 => config::parse_cpus(s).map(drop),
        2 => config::parse_memory(s).map(drop),
        3 => config::parse_serial(s).map(drop),
        4 => config::parse_disk(s).map(drop),
        5 => config::parse_net(s).map(drop),
        6 => config::parse_console_option(s).map(drop),
        7 => config::parse_rng(s).map(drop),
        8 => config::parse_user_device(s).map(drop),
        9 => config::parse_host_device(s).map(drop),
        10 => config::parse_size("memory", s).map(drop),
        _ => config::parse_options("restore", s, &["source_url", "resume"]).map(drop),
    };
}
