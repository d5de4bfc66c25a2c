//! How `guard deps` answers look: tables for people, a starting policy in
//! the format of `guard policy suggest`, and the graph in Graphviz's DOT.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

use comfy_table::{presets::UTF8_BORDERS_ONLY, ContentArrangement, Table};

use super::{
    analysis::{Affected, Cycle, Dependency, Edge},
    store::Service,
};

/// What an unclaimed name's service column shows.
pub const UNCLAIMED: &str = "(unclaimed)";

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_style(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.to_vec());
    table
}

/// A stored process chain as a table shows it: the asking process (last)
/// cut to 60 characters, its ancestors to 24 (the store and `--json` keep
/// it whole). Each keeps its pid, which ties it to the process.
fn chain_cell(chain: &str) -> String {
    let links: Vec<&str> = chain.split(" → ").collect();
    links
        .iter()
        .enumerate()
        .map(|(index, link)| {
            let width = if index + 1 == links.len() { 60 } else { 24 };
            if link.chars().count() <= width {
                return (*link).to_owned();
            }
            let pid = link.rfind('[').map_or("", |at| &link[at..]);
            let head: String = link.chars().take(width - 1).collect();
            format!("{head}…{pid}")
        })
        .collect::<Vec<_>>()
        .join(" → ")
}

fn tier_text(tier: Option<i64>) -> String {
    tier.map(|t| t.to_string()).unwrap_or_else(|| "-".into())
}

fn owner_text(owner: &Option<String>) -> String {
    owner.clone().unwrap_or_else(|| "-".into())
}

pub fn affected(target: &str, affected: &[Affected]) -> String {
    if affected.is_empty() {
        return format!("No deploy of another service resolved {target}.\n");
    }
    let mut table = table(&[
        "tier",
        "service",
        "owner",
        "names",
        "queries",
        "deploys",
        "verdict",
        "last seen",
        "example process chain",
    ]);
    for entry in affected {
        table.add_row(vec![
            tier_text(entry.tier),
            entry.service.clone(),
            owner_text(&entry.owner),
            entry.names.join(", "),
            entry.totals.queries.to_string(),
            entry.totals.deploys.to_string(),
            entry.totals.verdict.clone(),
            entry.totals.last_seen.clone(),
            chain_cell(&entry.totals.example_chain),
        ]);
    }
    format!(
        "Services whose deploys resolved {target} ({}), most critical tier first:\n{table}\n",
        affected.len()
    )
}

pub fn dependencies(service: &str, dependencies: &[Dependency]) -> String {
    if dependencies.is_empty() {
        return format!("No deploy of {service} is recorded.\n");
    }
    let mut table = table(&[
        "name",
        "service",
        "owner",
        "tier",
        "queries",
        "deploys",
        "verdict",
        "last seen",
        "example process chain",
    ]);
    for entry in dependencies {
        let name = if entry.via.is_empty() {
            entry.name.clone()
        } else {
            format!("{} (answer to {})", entry.name, entry.via)
        };
        table.add_row(vec![
            name,
            entry.service.clone().unwrap_or_else(|| UNCLAIMED.into()),
            owner_text(&entry.owner),
            tier_text(entry.tier),
            entry.totals.queries.to_string(),
            entry.totals.deploys.to_string(),
            entry.totals.verdict.clone(),
            entry.totals.last_seen.clone(),
            chain_cell(&entry.totals.example_chain),
        ]);
    }
    let services: BTreeSet<&str> = dependencies
        .iter()
        .filter_map(|d| d.service.as_deref())
        .filter(|s| *s != service)
        .collect();
    format!(
        "Deploys of {service} resolved {} names; they depend on {}:\n{table}\n",
        dependencies.len(),
        if services.is_empty() {
            "no service of the catalog".to_owned()
        } else {
            services.into_iter().collect::<Vec<_>>().join(", ")
        }
    )
}

pub fn cycles(cycles: &[Cycle]) -> String {
    if cycles.is_empty() {
        return "No cycles: no service's deploys depend, through other services, on itself.\n"
            .into();
    }
    let mut out = format!(
        "{} cycle(s) in the deploy-time service graph:\n",
        cycles.len()
    );
    for (index, cycle) in cycles.iter().enumerate() {
        let _ = writeln!(
            out,
            "\n{}. {} services: {}\n   cycle: {}",
            index + 1,
            cycle.services.len(),
            cycle.services.join(", "),
            cycle.path.join(" → ")
        );
        let mut table = table(&[
            "from",
            "to",
            "lookups",
            "witness: name",
            "host",
            "run",
            "seen",
            "process chain",
        ]);
        for edge in &cycle.edges {
            table.add_row(vec![
                edge.from.clone(),
                edge.to.clone(),
                edge.lookups.to_string(),
                edge.witness.name.clone(),
                edge.witness.host.clone(),
                edge.witness.run_id.clone(),
                edge.witness.first_seen.clone(),
                chain_cell(&edge.witness.process_chain),
            ]);
        }
        let _ = writeln!(out, "{table}");
    }
    out
}

/// A starting policy for `service`'s deploys that denies the names of the
/// services depending on it, so a rollback of it can never need them.
pub fn policy(
    service: &str,
    policy_name: &str,
    location: &str,
    dependents: &[Affected],
    services: &[Service],
    depends_on: &BTreeSet<String>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Starting policy suggested by `guard deps policy {service}` from {location}."
    );
    let _ = writeln!(out, "#");
    let _ = writeln!(
        out,
        "# The services below resolved names of {service} during their own deploys:"
    );
    let _ = writeln!(
        out,
        "# they depend on it. Denying their names during {service}'s deploys keeps"
    );
    let _ = writeln!(
        out,
        "# a rollback of {service} from ever needing them. Run it in audit mode for a"
    );
    let _ = writeln!(out, "# while, then switch `mode` to enforce.");
    let _ = writeln!(out, "name: {policy_name}");
    let _ = writeln!(
        out,
        "description: Deploys of {service} must not depend on the services that depend on it"
    );
    let _ = writeln!(out, "mode: audit");
    let mut deny: Vec<(String, String)> = Vec::new();
    let mut unnamed: Vec<&Affected> = Vec::new();
    for dependent in dependents {
        let names = services
            .iter()
            .find(|s| s.name == dependent.service)
            .map(|s| s.names.as_slice())
            .unwrap_or_default();
        if names.is_empty() {
            unnamed.push(dependent);
            continue;
        }
        let mut why = format!(
            "{} ({}, tier {}) resolves {}",
            dependent.service,
            owner_text(&dependent.owner),
            tier_text(dependent.tier),
            dependent.names.join(", ")
        );
        if depends_on.contains(&dependent.service) {
            why.push_str(&format!(
                "; {service}'s deploys resolve it too (a cycle: guard deps cycles)"
            ));
        }
        for pattern in names {
            deny.push((pattern.clone(), why.replace('\n', " ")));
        }
    }
    if deny.is_empty() {
        let _ = writeln!(out, "deny: []");
    } else {
        let _ = writeln!(out, "deny:");
        let width = deny.iter().map(|(p, _)| p.len()).max().unwrap_or(0) + 2;
        for (pattern, why) in &deny {
            let quoted = format!("\"{pattern}\"");
            let _ = writeln!(out, "  - {quoted:width$}  # {why}");
        }
    }
    if !unnamed.is_empty() {
        let _ = writeln!(
            out,
            "# Dependents the catalog lists no names for (add their names by hand):"
        );
        for dependent in unnamed {
            let _ = writeln!(
                out,
                "#  - {}  # resolves {}",
                dependent.service,
                dependent.names.join(", ")
            );
        }
    }
    let _ = writeln!(out, "allow: []");
    out
}

/// The service graph in Graphviz's DOT: services (with owner and tier),
/// unclaimed names as dashed ellipses, and the edges of cycles in red.
pub fn dot(
    services: &[Service],
    edges: &[Edge],
    cycles: &[Cycle],
    unclaimed: &BTreeMap<&str, BTreeSet<&str>>,
) -> String {
    let in_cycle: BTreeSet<(&str, &str)> = cycles
        .iter()
        .flat_map(|c| c.edges.iter().map(|e| (e.from.as_str(), e.to.as_str())))
        .collect();
    let mut nodes: BTreeSet<&str> = services.iter().map(|s| s.name.as_str()).collect();
    nodes.extend(edges.iter().flat_map(|e| [e.from.as_str(), e.to.as_str()]));
    nodes.extend(unclaimed.values().flatten().copied());
    let mut out = String::from(
        "digraph deploy_dependencies {\n  rankdir=LR;\n  node [shape=box, style=rounded, fontname=\"sans-serif\"];\n  edge [fontname=\"sans-serif\", fontsize=10];\n",
    );
    for node in &nodes {
        let service = services.iter().find(|s| s.name == *node);
        let mut label = (*node).to_owned();
        if let Some(service) = service {
            label.push_str(&format!(
                "\n{}, tier {}",
                owner_text(&service.owner),
                tier_text(service.tier)
            ));
        }
        let _ = writeln!(out, "  {} [label={}];", quote(node), quote(&label));
    }
    for name in unclaimed.keys() {
        let _ = writeln!(
            out,
            "  {} [label={}, shape=ellipse, style=dashed];",
            quote(&format!("name:{name}")),
            quote(&format!("{name}\n{UNCLAIMED}"))
        );
    }
    for edge in edges {
        let style = if in_cycle.contains(&(edge.from.as_str(), edge.to.as_str())) {
            ", color=red, fontcolor=red, penwidth=2"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "  {} -> {} [label={}{style}];",
            quote(&edge.from),
            quote(&edge.to),
            quote(&edge.witness.name)
        );
    }
    for (name, askers) in unclaimed {
        for asker in askers {
            let _ = writeln!(
                out,
                "  {} -> {} [style=dashed];",
                quote(asker),
                quote(&format!("name:{name}"))
            );
        }
    }
    out.push_str("}\n");
    out
}

/// A DOT string literal.
fn quote(text: &str) -> String {
    let mut quoted = String::from("\"");
    for ch in text.chars() {
        match ch {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            other => quoted.push(other),
        }
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_chain_links_are_cut_but_keep_their_pid() {
        let long = format!("sh -c {}[12] → curl {}[13]", "a".repeat(60), "b".repeat(70));
        let expected = format!(
            "sh -c {}…[12] → curl {}…[13]",
            "a".repeat(17),
            "b".repeat(54)
        );
        assert_eq!(chain_cell(&long), expected);
        assert_eq!(chain_cell("sh[1] → curl x[2]"), "sh[1] → curl x[2]");
    }
}
