#!/usr/bin/env bash
# System packages some tests use (headless Chromium for the web UI tests, a CJK font so their
# screenshots show Chinese: CHINESE_VICUNA_SCREENSHOTS=DIR pytest ...; Go, whose text/template
# runs the Ollama Modelfile's TEMPLATE in tests/test_ollama.py). Installed with
# apt-get when running as root and missing; otherwise those tests are skipped with a reason.
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v go >/dev/null 2>&1 || missing+=(golang-go)
[ -e /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc ] || missing+=(fonts-wqy-zenhei)
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: ${missing[*]} not installed (needs root + apt-get); tests that need it will be skipped" >&2
    exit 0
fi
echo "== installing ${missing[*]} (apt-get)"
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
