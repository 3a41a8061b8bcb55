//! Chaining `redirect-cni` into the node's CNI network configuration, as
//! Istio's CNI installer chains its plugin: the runtime uses the first
//! configuration file of the conf dir in name order (`.conflist`, `.conf`,
//! `.json`), so that file gets the plugin appended to its `plugins` (a
//! single-plugin `.conf` becomes a `.conflist` of the two); an entry of
//! ours already there is replaced, so installing again changes nothing;
//! unchaining removes only our entries. Files are replaced atomically (a
//! temporary file renamed over them), since the runtime may read them at
//! any moment.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

/// The plugin's `type`: the name the runtime runs from the bin dir.
pub const PLUGIN_TYPE: &str = "redirect-cni";

/// The network configuration files of `dir` (a CNI extension), in name
/// order: the order the runtime considers them in.
pub fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading the CNI conf dir {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|e| e == "conflist" || e == "conf" || e == "json")
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The configuration file the runtime reads: the first of [`files`].
pub fn active_file(dir: &Path) -> Result<PathBuf> {
    files(dir)?.into_iter().next().with_context(|| {
        format!(
            "no CNI network configuration in {}: install the pod network first (redirect-cni chains after its plugins)",
            dir.display()
        )
    })
}

/// `text` (a conflist or a single plugin's conf) with `plugin` as its last
/// plugin, replacing any entry of ours.
pub fn chained(text: &str, plugin: &Value) -> Result<Value> {
    let mut conf: Value =
        serde_json::from_str(text).context("the CNI configuration is not JSON")?;
    let Some(fields) = conf.as_object_mut() else {
        bail!("the CNI configuration is not a JSON object");
    };
    if !fields.contains_key("plugins") {
        // A single plugin's conf: the list of it and ours.
        let version = fields.get("cniVersion").cloned().unwrap_or(json!("1.0.0"));
        let name = fields.get("name").cloned().unwrap_or(json!("pods"));
        conf = json!({"cniVersion": version, "name": name, "plugins": [conf]});
    }
    let plugins = conf
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .context("the CNI configuration's plugins is not a list")?;
    plugins.retain(|p| !ours(p));
    if plugins.is_empty() {
        bail!("the CNI configuration has no plugin to chain after");
    }
    plugins.push(plugin.clone());
    Ok(conf)
}

/// `text` without our entries; `None` when it has none.
pub fn unchained(text: &str) -> Result<Option<Value>> {
    let mut conf: Value =
        serde_json::from_str(text).context("the CNI configuration is not JSON")?;
    let Some(plugins) = conf.get_mut("plugins").and_then(Value::as_array_mut) else {
        return Ok(None);
    };
    let before = plugins.len();
    plugins.retain(|p| !ours(p));
    Ok((plugins.len() != before).then_some(conf))
}

/// Whether the configuration lists our plugin.
pub fn is_chained(text: &str) -> bool {
    serde_json::from_str::<Value>(text).is_ok_and(|conf| {
        conf.get("plugins")
            .and_then(Value::as_array)
            .is_some_and(|ps| ps.iter().any(ours))
    })
}

/// Our plugin's entry in the configuration, if it lists it.
pub fn our_entry(text: &str) -> Option<Value> {
    let conf = serde_json::from_str::<Value>(text).ok()?;
    conf.get("plugins")?
        .as_array()?
        .iter()
        .find(|p| ours(p))
        .cloned()
}

fn ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// Writes `conf` to `path` atomically (pretty JSON, a temporary file in the
/// same directory renamed over it).
pub fn write(path: &Path, conf: &Value) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.redirect-tmp", std::process::id()));
    let text = serde_json::to_string_pretty(conf)? + "\n";
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| {
        let _ = fs::remove_file(&tmp);
        format!("replacing {}", path.display())
    })
}

/// Removes the temporary files (`.<name>.<pid>.redirect-tmp`) that an
/// interrupted `node install` left in `dir`: those of processes that are
/// gone. The runtime never reads them (not a configuration's extension).
pub fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_suffix(".redirect-tmp")
            .and_then(|rest| rest.rsplit_once('.'))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if name.starts_with('.') && !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin() -> Value {
        json!({"type": PLUGIN_TYPE, "mode": "auto"})
    }

    const BRIDGE: &str = r#"{"cniVersion":"1.0.0","name":"pods","plugins":[
        {"type":"bridge","bridge":"cni0"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    #[test]
    fn chaining_appends_once_and_unchaining_restores() {
        let once = chained(BRIDGE, &plugin()).unwrap();
        let twice = chained(
            &once.to_string(),
            &json!({"type": PLUGIN_TYPE, "mode": "ebpf"}),
        )
        .unwrap();
        let types: Vec<&str> = twice["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["bridge", "portmap", PLUGIN_TYPE]);
        assert_eq!(
            twice["plugins"][2]["mode"], "ebpf",
            "the newer entry replaces ours"
        );
        assert!(is_chained(&twice.to_string()) && !is_chained(BRIDGE));
        let back = unchained(&twice.to_string()).unwrap().unwrap();
        assert_eq!(back, serde_json::from_str::<Value>(BRIDGE).unwrap());
        assert_eq!(unchained(BRIDGE).unwrap(), None);
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list() {
        let conf = r#"{"cniVersion":"0.4.0","name":"net","type":"bridge"}"#;
        let list = chained(conf, &plugin()).unwrap();
        assert_eq!(list["cniVersion"], "0.4.0");
        assert_eq!(list["name"], "net");
        assert_eq!(list["plugins"][0]["type"], "bridge");
        assert_eq!(list["plugins"][1]["type"], PLUGIN_TYPE);
    }

    #[test]
    fn configurations_it_cannot_chain_into_are_errors() {
        for bad in [
            "",
            "[]",
            r#"{"plugins":{}}"#,
            &format!(r#"{{"plugins":[{{"type":"{PLUGIN_TYPE}"}}]}}"#),
        ] {
            assert!(chained(bad, &plugin()).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_runtimes_file_is_the_first_by_name() {
        let dir = std::env::temp_dir().join(format!("redirect-conflist-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert!(active_file(&dir).is_err());
        for name in ["20-b.conflist", "10-a.conf", "05-notes.txt"] {
            fs::write(dir.join(name), "{}").unwrap();
        }
        assert_eq!(active_file(&dir).unwrap(), dir.join("10-a.conf"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_the_temporaries_of_dead_processes_are_removed() {
        let dir = std::env::temp_dir().join(format!("redirect-tmp-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let live = format!(".10-pods.conflist.{}.redirect-tmp", std::process::id());
        // Pids are below 2^22: this one never runs.
        let dead = ".10-pods.conflist.4294967295.redirect-tmp";
        for name in [live.as_str(), dead, "10-pods.conflist", ".other"] {
            fs::write(dir.join(name), "{}").unwrap();
        }
        remove_stale_temporaries(&dir);
        let mut left: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(left, [live.as_str(), ".other", "10-pods.conflist"]);
    }
}
