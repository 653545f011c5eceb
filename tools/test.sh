#!/usr/bin/env bash
# The one command that runs every shardmq test, installing what the tests need by itself.
#
#   tools/test.sh
#
# Steps: install missing tools (rustfmt, clippy, cargo-fuzz, mosquitto-clients, paho-mqtt,
# haproxy, nodejs/npm and MQTT.js, fonts-dejavu-core, chromium, chromium-driver and selenium)
# -> cargo fmt --check -> clippy (warnings are errors) -> the
# malformed corpus matches its generator -> a short run of every fuzz target of net/fuzz and
# shards/fuzz -> cargo test for the whole workspace (last, so that its summary closes the
# output).
#
# Environment:
#   SHARDMQ_FUZZ_SECONDS  length of each fuzz target's run (default 20; 0 skips fuzzing)
set -euo pipefail

cd "$(dirname "$0")/.."
fuzz_seconds="${SHARDMQ_FUZZ_SECONDS:-20}"

step() { printf '\n==> %s\n' "$*"; }

step "checking tools"
command -v cargo >/dev/null || { echo "cargo is required (rustup.rs)"; exit 1; }
command -v python3 >/dev/null || {
    echo "python3 missing: installing it with apt-get"
    apt-get update -qq && apt-get install -y -qq python3
}
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
# Real clients the integration tests drive the broker with.
if ! command -v mosquitto_pub >/dev/null || ! command -v mosquitto_sub >/dev/null; then
    echo "mosquitto-clients missing: installing it with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq mosquitto-clients
fi
# The broker and mosquitto_passwd, for the password-file tests (auth_passwd, auth_broker).
if ! command -v mosquitto_passwd >/dev/null || ! command -v mosquitto >/dev/null; then
    echo "mosquitto missing: installing it with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq mosquitto
fi
if ! python3 -c "import paho.mqtt, sys; sys.exit(0 if int(paho.mqtt.__version__.split('.')[0]) >= 2 else 1)" 2>/dev/null; then
    echo "paho-mqtt 2 missing: installing it from PyPI"
    python3 -m pip install --quiet --disable-pip-version-check "paho-mqtt>=2,<3" \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "paho-mqtt>=2,<3"
fi
# The Prometheus project's text parser, which tests/admin_metrics.rs reads /metrics with.
if ! python3 -c "import prometheus_client.openmetrics.parser" 2>/dev/null; then
    echo "prometheus-client (Python) missing: installing it from PyPI"
    python3 -m pip install --quiet --disable-pip-version-check "prometheus-client>=0.20,<1" \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "prometheus-client>=0.20,<1"
fi
# tests/dashboard.rs drives the web dashboard in Debian's headless Chromium with Selenium
# (pointed at /usr/bin/chromedriver, so Selenium Manager downloads nothing).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    echo "chromium/chromium-driver missing: installing them with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq chromium chromium-driver
fi
if ! python3 -c "import selenium, sys; sys.exit(0 if int(selenium.__version__.split('.')[0]) >= 4 else 1)" 2>/dev/null; then
    echo "selenium 4 missing: installing it from PyPI"
    python3 -m pip install --quiet --disable-pip-version-check "selenium>=4.10,<5" \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "selenium>=4.10,<5"
fi
# tests/broker_proxy.rs puts a real HAProxy in front of the broker.
if ! command -v haproxy >/dev/null; then
    echo "haproxy missing: installing it with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq haproxy
fi
# tests/broker_ws.rs drives the broker with MQTT.js (npm package `mqtt`, locked in
# tools/js/package-lock.json) under Node.js.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "nodejs/npm missing: installing them with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq nodejs npm
fi
if [ ! -d tools/js/node_modules/mqtt ]; then
    echo "MQTT.js missing: installing it from npm into tools/js"
    (cd tools/js && npm ci --no-audit --no-fund --silent)
fi
# The partition tests cut links between network namespaces with `ip` (iproute2).
if ! command -v ip >/dev/null; then
    echo "iproute2 missing: installing it with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq iproute2
fi
# tests/cluster_tls.rs makes its certificates with openssl.
if ! command -v openssl >/dev/null; then
    echo "openssl missing: installing it with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq openssl
fi
# The font shardmq-bench compare draws its chart's text with.
if [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
    echo "fonts-dejavu-core missing: installing it with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq fonts-dejavu-core
fi
if [ "$fuzz_seconds" != 0 ] && ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz missing: installing it from crates.io"
    cargo install cargo-fuzz --locked
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --all-features -- -D warnings

step "malformed corpus matches tools/gen_malformed_corpus.py"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
cp -r tests/corpus/malformed "$scratch/committed"
python3 tools/gen_malformed_corpus.py >/dev/null
if ! diff -r "$scratch/committed" tests/corpus/malformed; then
    echo "tests/corpus/malformed differs from what the generator writes: regenerate and commit"
    exit 1
fi

if [ "$fuzz_seconds" != 0 ]; then
    # Seeds of the decoder: the malformed corpus, once per version and sending side (the first
    # byte of a fuzz input selects them; see net/fuzz/fuzz_targets/decode.rs).
    seeds="$scratch/seeds"
    mkdir -p "$seeds"
    python3 - "$seeds" <<'PY'
import pathlib, sys
out = pathlib.Path(sys.argv[1])
for path in pathlib.Path("tests/corpus/malformed").glob("*.txt"):
    hex_line = next(l for l in path.read_text().splitlines() if l.startswith("hex: "))
    data = bytes.fromhex(hex_line[5:])
    for selector in (0x00, 0x01, 0x02, 0x81, 0x82):
        (out / f"{path.stem}-{selector:02x}").write_bytes(bytes([selector]) + data)
PY
    # Every target of each fuzz crate, as `cargo fuzz list` names them, so that a new target
    # runs without editing this script. A target's seeds are its crate's `seeds/` folder if
    # there is one, plus the malformed corpus for `decode`.
    for crate in net shards; do
        targets="$(cd "$crate/fuzz" && cargo fuzz list)"
        for target in $targets; do
            step "fuzzing $crate/fuzz target $target for ${fuzz_seconds}s"
            corpora=("$scratch/fuzz-corpus-$crate-$target")
            mkdir -p "${corpora[0]}"
            [ -d "$crate/fuzz/seeds" ] && corpora+=("$PWD/$crate/fuzz/seeds")
            [ "$target" = decode ] && corpora+=("$seeds")
            # cargo-fuzz needs nightly flags (-Zsanitizer); RUSTC_BOOTSTRAP lets the stable
            # toolchain accept them. -rss_limit_mb makes memory growth a failure. With
            # pipefail, the pipeline fails when cargo fuzz does; tail keeps the log short.
            if ! (cd "$crate/fuzz" && RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "${corpora[@]}" -- \
                    -max_total_time="$fuzz_seconds" -max_len=4096 -rss_limit_mb=1024 \
                    -print_final_stats=1) 2>&1 | tail -n 25
            then
                echo "the fuzz run failed: a crash is saved under $crate/fuzz/artifacts/$target/"
                exit 1
            fi
        done
    done
fi

step "cargo test --workspace"
cargo test --workspace
