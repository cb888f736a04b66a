#!/usr/bin/env node
// `npm test`: the jest suite against every addon that is built (the cmake-js one,
// with CUDA when nvcc was found, and the node-gyp one), then the C++ tests with ctest
// in every CMake build tree. Prints one closing line: `N passed, N failed, N skipped`.
'use strict';
const { spawnSync } = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');

const root = path.resolve(__dirname, '..');
const totals = { passed: 0, failed: 0, skipped: 0 };
let anyRunnerFailed = false;

function run(command, args, env) {
  console.log(`\n$ ${[command, ...args].join(' ')}`);
  const result = spawnSync(command, args, { cwd: root, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  const out = (result.stdout || '').toString() + (result.stderr || '').toString();
  process.stdout.write(out);
  if (result.error) console.log(String(result.error));
  return { status: result.status, out };
}

const addons = [
  ['cmake-js', 'build-cmake/Release/ppo_max.node'],
  ['node-gyp', 'build/Release/ppo_max.node'],
].filter(([, p]) => fs.existsSync(path.join(root, p)));

if (addons.length === 0) {
  console.log('no addon is built: run `npm run build` (or `npx ppo-max build`) first');
  totals.failed += 1;
}

const jestBin = require.resolve('jest/bin/jest');
for (const [name, addon] of addons) {
  const report = path.join(os.tmpdir(), `ppo-max-jest-${process.pid}-${name}.json`);
  const { status } = run(process.execPath, [jestBin, '--json', `--outputFile=${report}`], {
    PPO_MAX_ADDON: path.join(root, addon),
  });
  let counted = false;
  try {
    const r = JSON.parse(fs.readFileSync(report, 'utf8'));
    console.log(`jest (${name} addon): ${r.numPassedTests} passed, ${r.numFailedTests} failed, ${r.numPendingTests} skipped`);
    totals.passed += r.numPassedTests;
    totals.failed += r.numFailedTests + (r.numRuntimeErrorTestSuites || 0);
    totals.skipped += r.numPendingTests;
    counted = r.numTotalTests > 0;
    fs.unlinkSync(report);
  } catch (e) {
    console.log(`jest (${name} addon) wrote no report: ${e.message}`);
  }
  if (status !== 0 || !counted) anyRunnerFailed = true;
}

for (const dir of ['build-cmake', 'build-native']) {
  if (!fs.existsSync(path.join(root, dir, 'CTestTestfile.cmake'))) continue;
  const { status, out } = run('ctest', ['--test-dir', dir, '--output-on-failure']);
  const summary = out.match(/(\d+)% tests passed, (\d+) tests? failed out of (\d+)/);
  const skipped = (out.match(/\*\*\*Skipped/g) || []).length;
  if (summary) {
    const failed = Number(summary[2]);
    const total = Number(summary[3]);
    totals.failed += failed;
    totals.skipped += skipped;
    totals.passed += total - failed - skipped;
    console.log(`ctest (${dir}): ${total - failed - skipped} passed, ${failed} failed, ${skipped} skipped`);
  } else {
    console.log(`ctest (${dir}) printed no summary`);
    anyRunnerFailed = true;
  }
  if (status !== 0) anyRunnerFailed = true;
}

if (anyRunnerFailed && totals.failed === 0) totals.failed = 1;  // a runner broke without counting
console.log(`\n${totals.passed} passed, ${totals.failed} failed, ${totals.skipped} skipped`);
process.exit(totals.failed === 0 ? 0 : 1);
