//! A strict reader of weft's Prometheus/OpenMetrics exposition, for the tests that scrape a
//! daemon (it lives here, not in the product).

/// One sample of an exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric name as exposed (with `_total` and unit suffixes).
    pub name: String,
    /// Its labels, in order.
    pub labels: Vec<(String, String)>,
    /// Its value.
    pub value: f64,
}

/// Reads an exposition strictly: every line a `# HELP`, `# TYPE` or `# UNIT` line, a sample
/// of a declared family with a numeric value, and `# EOF` last.
pub fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    let mut families: Vec<String> = Vec::new();
    let mut samples = Vec::new();
    let mut eof = false;
    for (i, line) in text.lines().enumerate() {
        let at = |m: &str| format!("line {}: {m}: {line:?}", i + 1);
        if eof {
            return Err(at("content after # EOF"));
        }
        if line == "# EOF" {
            eof = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut w = rest.splitn(3, ' ');
            let (kind, name) = (w.next().unwrap_or(""), w.next().unwrap_or(""));
            match kind {
                "TYPE" => {
                    let t = w.next().unwrap_or("");
                    if ![
                        "counter",
                        "gauge",
                        "histogram",
                        "summary",
                        "info",
                        "stateset",
                        "unknown",
                    ]
                    .contains(&t)
                    {
                        return Err(at("unknown type"));
                    }
                    families.push(name.to_owned());
                }
                "HELP" | "UNIT" => {}
                _ => return Err(at("unknown comment")),
            }
            if !name.starts_with("weft_") {
                return Err(at("a family outside weft_"));
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| at("no value"))?;
        let value: f64 = value.parse().map_err(|_| at("value not a number"))?;
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .ok_or_else(|| at("unclosed labels"))?;
                let mut labels = Vec::new();
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").ok_or_else(|| at("bad label"))?;
                    labels.push((k.to_owned(), v.trim_end_matches('"').to_owned()));
                }
                (n, labels)
            }
            None => (series, Vec::new()),
        };
        let declared = families.iter().any(|f| {
            name == f
                || ["_total", "_created", "_info"]
                    .iter()
                    .any(|s| name == format!("{f}{s}"))
        });
        if !declared {
            return Err(at("sample of an undeclared family"));
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    if !eof {
        return Err("no # EOF at the end".into());
    }
    Ok(samples)
}

/// The value of the first of `samples` named `name` that carries every label in `labels` (and
/// may carry more).
pub fn value_of(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        })
        .map(|s| s.value)
}

/// [`value_of`] in an HTTP response to `GET /metrics`, its body read with
/// [`parse_exposition`]. The error names what was missing.
pub fn sample_value(response: &str, name: &str, labels: &[(&str, &str)]) -> Result<f64, String> {
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .ok_or_else(|| format!("no body in the metrics response: {response:?}"))?;
    value_of(&parse_exposition(body)?, name, labels)
        .ok_or_else(|| format!("no sample {name} {labels:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reader_refuses_what_is_not_an_exposition() {
        for bad in [
            "weft_x 1\n# EOF\n",
            "# TYPE weft_x counter\nweft_x_total one\n# EOF\n",
            "# TYPE weft_x counter\nweft_x_total 1\n",
            "# TYPE weft_x bogus\n# EOF\n",
        ] {
            assert!(parse_exposition(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_daemons_exposition_of_a_snapshot_reads_back() {
        let ipam = weft::api::metrics::IpamCounters::default();
        ipam.reclaims.store(2, std::sync::atomic::Ordering::Relaxed);
        let mut drops = weft_router::Drops::default();
        drops.count(weft_router::DropReason::NoRoute);
        let snap = weft_router::driver::Snapshot {
            public_key: [0; 32],
            peers: Vec::new(),
            drops,
            send_errors: 0,
            tun_write_errors: 0,
            send_turn_takeovers: 3,
            workers: vec![
                weft_router::driver::WorkerCounters {
                    tun_packets: 5,
                    datagrams: 7,
                },
                weft_router::driver::WorkerCounters::default(),
            ],
        };
        let body = weft::api::metrics::render(&snap, None, &ipam);
        let samples = parse_exposition(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
        let find = |n: &str| value_of(&samples, n, &[]);
        assert_eq!(find("weft_ipam_reclaims_total"), Some(2.0), "{body}");
        assert_eq!(find("weft_drops_total"), Some(1.0), "{body}");
        let worker = |w: &str, from: &str| {
            value_of(
                &samples,
                "weft_router_worker_packets_total",
                &[("worker", w), ("from", from)],
            )
        };
        assert_eq!(worker("0", "tun"), Some(5.0), "{body}");
        assert_eq!(worker("0", "network"), Some(7.0), "{body}");
        assert_eq!(worker("1", "network"), Some(0.0), "{body}");
        assert_eq!(
            find("weft_router_send_turn_takeovers_total"),
            Some(3.0),
            "{body}"
        );
    }

    #[test]
    fn a_sample_is_found_by_name_and_labels_in_a_response_and_its_absence_named() {
        let response = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n\
            # TYPE weft_x counter\n\
            weft_x_total{worker=\"0\",from=\"tun\"} 5\n\
            weft_x_total{worker=\"1\",from=\"tun\"} 7\n\
            # EOF\n";
        assert_eq!(
            sample_value(response, "weft_x_total", &[("worker", "1")]),
            Ok(7.0)
        );
        assert_eq!(sample_value(response, "weft_x_total", &[]), Ok(5.0));
        let e = sample_value(response, "weft_x_total", &[("worker", "2")]).unwrap_err();
        assert!(e.contains("weft_x_total") && e.contains("\"2\""), "{e}");
        let e = sample_value("HTTP/1.1 200 OK", "weft_x_total", &[]).unwrap_err();
        assert!(e.contains("no body"), "{e}");
    }
}
