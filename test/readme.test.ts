/**
 * The README's quick example must keep working: it is extracted, type-checked against
 * the package's sources and run.
 */
import { describe, expect, test } from '@jest/globals';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import * as ts from 'typescript';

const root = path.resolve(__dirname, '..');

// The first ts block after the heading `heading`.
function example(heading: string): string {
  const readme = fs.readFileSync(path.join(root, 'README.md'), 'utf8');
  const at = readme.indexOf(`${heading}\n`);
  const match = at < 0 ? null : readme.slice(at).match(/```ts\n([\s\S]*?)```/);
  if (!match) throw new Error(`README.md has no ts block under "${heading}"`);
  return match[1];
}

// Type-checks a README example (strict) against the package's sources, runs it, and
// returns what it logged.
async function typeCheckAndRun(code0: string): Promise<unknown[]> {
  {
    const lib = path.join(root, 'lib').split(path.sep).join('/');
    const code = code0.replace(/from 'ppo-max'/g, `from '${lib}'`);
    const imports = code.split('\n').filter((l) => l.startsWith('import '));
    const body = code.split('\n').filter((l) => !l.startsWith('import '));
    const source = `${imports.join('\n')}\nexport async function run(): Promise<void> {\n${body.join('\n')}\n}\n`;
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ppo-max-readme-'));
    const file = path.join(dir, 'example.ts');
    fs.writeFileSync(file, source);

    const program = ts.createProgram([file], {
      strict: true,
      target: ts.ScriptTarget.ES2020,
      module: ts.ModuleKind.CommonJS,
      esModuleInterop: true,
      skipLibCheck: true,
      types: ['node'],
      typeRoots: [path.join(root, 'node_modules', '@types')],
      outDir: dir,
      rootDir: '/',
    });
    const diagnostics = ts
      .getPreEmitDiagnostics(program)
      .map((d) => ts.flattenDiagnosticMessageText(d.messageText, '\n'));
    expect(diagnostics).toEqual([]);

    const js = ts.transpileModule(source, { compilerOptions: { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2020 } }).outputText;
    const mod: { exports: { run?: () => Promise<void> } } = { exports: {} };
    const logged: unknown[] = [];
    const fakeConsole = { ...console, log: (...args: unknown[]) => logged.push(args) };
    // The example imports the TypeScript sources, which jest's require compiles.
    new Function('require', 'module', 'exports', 'console', js)(require, mod, mod.exports, fakeConsole);
    await mod.exports.run!();
    return logged;
  }
}

describe('README examples', () => {
  test('the quick example type-checks and runs', async () => {
    const logged = await typeCheckAndRun(example('## Quick example'));
    expect(logged.length).toBe(1);
    const [loss, clipFraction, approxKl, grad] = logged[0] as [number, number, number, Float32Array];
    expect(Number.isFinite(loss)).toBe(true);
    expect(clipFraction).toBe(0); // new == old log-probs: nothing clipped
    expect(approxKl).toBe(0);
    expect(grad.length).toBe(8);
  });

  test('the model example type-checks and runs', async () => {
    const logged = await typeCheckAndRun(example('## The model (GPT-2 and Llama)'));
    expect(logged.length).toBe(1);
    const [loss, tokens, logprobs] = logged[0] as [number, Int32Array, Float32Array];
    expect(loss).toBeGreaterThan(3); // ~log(64) for a fresh model
    expect(loss).toBeLessThan(5);
    expect(ArrayBuffer.isView(tokens)).toBe(true);
    expect(tokens.length).toBeGreaterThan(0);
    expect(logprobs.length).toBe(10);
    expect(logprobs[0]).toBe(0); // no prediction for the first token
    expect(logprobs[1]).toBeLessThan(0);
  }, 30000);

  test('the trainers example type-checks and runs', async () => {
    const logged = await typeCheckAndRun(example('## The trainers (SFT, reward model, PPO-max)'));
    expect(logged.length).toBe(1);
    const [reward, kl, policyLoss, valueLoss] = logged[0] as number[];
    expect(reward).toBeGreaterThanOrEqual(0);
    expect(reward).toBeLessThanOrEqual(1);
    for (const x of [kl, policyLoss, valueLoss]) expect(Number.isFinite(x)).toBe(true);
  }, 30000);
});
