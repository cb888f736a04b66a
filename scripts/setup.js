#!/usr/bin/env node
// Makes a fresh checkout ready, doing only what is missing: npm ci, the TypeScript
// build, and the native addon (cmake-js with CUDA when nvcc is found, with the C++
// tests; node-gyp when CMake is absent). Used by `npm run demo` and `npm test` so that
// each works as the first command on a new machine. Node built-ins only.
'use strict';
const { spawnSync } = require('child_process');
const fs = require('fs');
const path = require('path');

const root = path.resolve(__dirname, '..');
const npm = process.platform === 'win32' ? 'npm.cmd' : 'npm';

function sh(command, args) {
  console.log(`[setup] ${command} ${args.join(' ')}`);
  const r = spawnSync(command, args, { cwd: root, stdio: 'inherit' });
  if (r.status !== 0) {
    console.error(`[setup] failed: ${command} ${args.join(' ')} (exit ${r.status})`);
    process.exit(r.status || 1);
  }
}

function works(command, args) {
  return spawnSync(command, args, { stdio: 'ignore' }).status === 0;
}

function newerThan(target, sources) {
  if (!fs.existsSync(target)) return false;
  const t = fs.statSync(target).mtimeMs;
  const walk = (p) => {
    const st = fs.statSync(p);
    if (st.isDirectory()) return fs.readdirSync(p).every((e) => walk(path.join(p, e)));
    return st.mtimeMs <= t;
  };
  return sources.every((s) => !fs.existsSync(path.join(root, s)) || walk(path.join(root, s)));
}

if (!fs.existsSync(path.join(root, 'node_modules', 'jest'))) {
  sh(npm, fs.existsSync(path.join(root, 'package-lock.json')) ? ['ci', '--no-audit', '--no-fund'] : ['install']);
}
if (!newerThan(path.join(root, 'dist', 'lib', 'index.js'), ['lib'])) sh(npm, ['run', 'build:ts']);
const addons = ['build-cmake/Release/ppo_max.node', 'build/Release/ppo_max.node'].map((p) => path.join(root, p));
const native = ['csrc', 'CMakeLists.txt', 'binding.gyp'];
if (!addons.some((a) => newerThan(a, native))) {
  if (works('cmake', ['--version'])) sh(npm, ['run', 'build:cmake']);
  else sh(npm, ['run', 'build:gyp']);
}
