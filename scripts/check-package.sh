#!/usr/bin/env bash
# Checks the npm package as a user gets it: `npm pack`, install the tarball into a new
# project (install scripts skipped, as npm 11 does by default for dependencies), see the
# first call fail with ERR_NATIVE_NOT_BUILT naming `npx ppo-max build`, run that, and see
# an op work. Exits non-zero on any failure.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$root"
npm pack --silent --pack-destination "$work" >/dev/null
cd "$work"
npm init -y >/dev/null
PPO_MAX_SKIP_BUILD=1 npm install --no-audit --no-fund ./ppo-max-*.tgz >/dev/null
node -e "
const p = require('ppo-max');
try { p.gaeSync({ batch: 1, steps: 1, rewards: [1], values: [0] }); process.exit(1); }
catch (e) {
  if (e.code !== 'ERR_NATIVE_NOT_BUILT' || !/npx ppo-max build/.test(e.message)) { console.error(e); process.exit(1); }
  console.log('before build:', e.code);
}"
npx ppo-max build --cuda off >/dev/null
node -e "
const p = require('ppo-max');
const r = p.gaeSync({ batch: 1, steps: 2, rewards: [0, 1], values: [0, 0] }, { gamma: 1, lambda: 1 });
if (r.returns[0] !== 1 || r.returns[1] !== 1) { console.error(r); process.exit(1); }
console.log('after build: ok,', p.backendInfo().addonPath.replace(process.cwd(), '.'));"
echo "package check passed"
