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

function quickExample(): string {
  const readme = fs.readFileSync(path.join(root, 'README.md'), 'utf8');
  const match = readme.match(/## Quick example\n\n```ts\n([\s\S]*?)```/);
  if (!match) throw new Error('README.md has no "## Quick example" ts block');
  return match[1];
}

describe('README quick example', () => {
  test('type-checks and runs', async () => {
    const lib = path.join(root, 'lib').split(path.sep).join('/');
    const code = quickExample().replace(/from 'ppo-max'/g, `from '${lib}'`);
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
    expect(logged.length).toBe(1);
    const [loss, clipFraction, approxKl, grad] = logged[0] as [number, number, number, Float32Array];
    expect(Number.isFinite(loss)).toBe(true);
    expect(clipFraction).toBe(0); // new == old log-probs: nothing clipped
    expect(approxKl).toBe(0);
    expect(grad.length).toBe(8);
  });
});
