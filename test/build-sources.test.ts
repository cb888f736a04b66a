/**
 * binding.gyp (node-gyp) and CMakeLists.txt (cmake-js and plain CMake) must build the
 * same sources: this test fails when they drift, or when a source file in csrc/ is in
 * neither build.
 */
import * as fs from 'fs';
import * as path from 'path';

const root = path.resolve(__dirname, '..');

function cmakeList(text: string, name: string): string[] {
  const m = text.match(new RegExp(`set\\(${name}\\s+([^)]*)\\)`));
  if (!m) throw new Error(`CMakeLists.txt has no set(${name} ...)`);
  return m[1].split(/\s+/).filter((s) => s && !s.startsWith('#'));
}

function filesUnder(dir: string, exts: string[]): string[] {
  const out: string[] = [];
  for (const entry of fs.readdirSync(path.join(root, dir), { withFileTypes: true })) {
    const rel = `${dir}/${entry.name}`;
    if (entry.isDirectory()) out.push(...filesUnder(rel, exts));
    else if (exts.some((e) => entry.name.endsWith(e))) out.push(rel);
  }
  return out;
}

describe('build source lists', () => {
  const cmake = fs.readFileSync(path.join(root, 'CMakeLists.txt'), 'utf8');
  const gyp = JSON.parse(fs.readFileSync(path.join(root, 'binding.gyp'), 'utf8'));
  const gypSources: string[] = gyp.targets[0].sources;
  const core = cmakeList(cmake, 'PPO_CORE_SOURCES');
  const cpu = cmakeList(cmake, 'PPO_CPU_SOURCES');
  const model = cmakeList(cmake, 'PPO_MODEL_SOURCES');
  const cuda = cmakeList(cmake, 'PPO_CUDA_SOURCES');
  const noCuda = cmakeList(cmake, 'PPO_NO_CUDA_SOURCES');
  const addon = cmakeList(cmake, 'PPO_ADDON_SOURCES');

  test('binding.gyp builds exactly the CPU addon sources that CMake builds', () => {
    expect([...gypSources].sort()).toEqual([...core, ...cpu, ...model, ...noCuda, ...addon].sort());
  });

  test('every source file in csrc/ is in the CMake lists, and every listed file exists', () => {
    const listed = [...core, ...cpu, ...model, ...cuda, ...noCuda, ...addon];
    expect(filesUnder('csrc', ['.cpp', '.cu']).sort()).toEqual([...listed].sort());
  });

  test('napi.h is included only under csrc/addon', () => {
    const offenders = filesUnder('csrc', ['.cpp', '.cu', '.h', '.cuh'])
      .filter((f) => !f.startsWith('csrc/addon/'))
      .filter((f) => /#include\s*[<"](napi|node_api)\.h/.test(fs.readFileSync(path.join(root, f), 'utf8')));
    expect(offenders).toEqual([]);
  });

  test('CUDA architectures are named explicitly (80 and 90 at least)', () => {
    expect(cmake).toMatch(/CMAKE_CUDA_ARCHITECTURES "80;90"/);
  });
});
