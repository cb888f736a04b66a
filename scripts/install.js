#!/usr/bin/env node
// npm's install hook. npm 11 runs a dependency's install script only when the
// consuming project allows it; when it does, this builds the addon now. It never fails
// the install: without a compiler the first use of ppo-max says to run
// `npx ppo-max build`. In a git checkout of ppo-max itself it does nothing (the
// developer builds with `npm run build`).
'use strict';
const fs = require('fs');
const path = require('path');
const { spawnSync } = require('child_process');

const root = path.resolve(__dirname, '..');
if (fs.existsSync(path.join(root, '.git')) || process.env.PPO_MAX_SKIP_BUILD) process.exit(0);
const cli = path.join(root, 'dist', 'lib', 'cli.js');
if (!fs.existsSync(cli)) process.exit(0);
const result = spawnSync(process.execPath, [cli, 'build'], { cwd: root, stdio: 'inherit' });
if (result.status !== 0) {
  console.warn('ppo-max: the native addon could not be built now; run `npx ppo-max build` before use.');
}
process.exit(0);
