#!/usr/bin/env node
/**
 * `npx ppo-max <command>`:
 *   build   build the native addon (cmake-js with CUDA when nvcc is found, else node-gyp)
 *   demo    a whole RLHF pipeline on a toy language (SFT, reward model, PPO: ppoMax vs vanilla);
 *           --kernels: one PPO-max step's math through the kernels on a synthetic batch
 *   info    print the loaded backend: addon path, CUDA, threads
 * Exit codes: 0 success, 1 failure, 2 bad usage.
 */
import { buildAddon } from './build';
import { backendInfo } from './device';
import { runDemo } from './demo';
import { runPipelineDemo } from './pipeline-demo';
import { isPpoMaxError } from './errors';

const HELP = `usage: ppo-max <command> [options]

commands:
  build            build the native addon in the installed package
      --tool cmake|gyp|auto   build tool (default auto: cmake-js when CMake is found)
      --cuda auto|on|off      compile the CUDA backend (default auto: when nvcc is found)
      --tests                 also build the C++ tests and benchmarks (cmake)
  demo             a whole RLHF pipeline on a toy language, on the CPU in well under a minute:
                   SFT, simulated preference labels, a reward model, critic pre-training,
                   then PPO under ppoMax and under vanilla from the same start, compared
      --ppo-steps N           PPO steps per preset (default 40)
      --seed N
  demo --kernels   one PPO-max step's math through the native kernels on a synthetic batch
      --batch N  --steps N  --vocab N  --device cpu|cuda|auto  --seed N
  info             the loaded addon, CUDA availability and CPU threads
  help             this text

exit codes: 0 success, 1 failure, 2 bad usage`;

function parseFlags(args: string[]): Record<string, string | true> {
  const flags: Record<string, string | true> = {};
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (!a.startsWith('--')) throw new Error(`unexpected argument ${a}`);
    const key = a.slice(2);
    const next = args[i + 1];
    if (next === undefined || next.startsWith('--')) flags[key] = true;
    else {
      flags[key] = next;
      i++;
    }
  }
  return flags;
}

function intFlag(flags: Record<string, string | true>, name: string): number | undefined {
  const v = flags[name];
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n <= 0) throw new Error(`--${name} must be a positive integer`);
  return n;
}

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  let flags: Record<string, string | true>;
  try {
    flags = parseFlags(rest);
  } catch (e) {
    console.error(`${(e as Error).message}\n\n${HELP}`);
    return 2;
  }
  try {
    switch (command) {
      case 'build': {
        const built = buildAddon({
          tool: (flags.tool as 'cmake' | 'gyp' | 'auto') ?? 'auto',
          cuda: (flags.cuda as 'auto' | 'on' | 'off') ?? 'auto',
          tests: flags.tests === true,
        });
        console.log(`ppo-max: built ${built}`);
        return 0;
      }
      case 'demo':
        if (flags.kernels !== true) {
          await runPipelineDemo({ ppoSteps: intFlag(flags, 'ppo-steps'), seed: intFlag(flags, 'seed') });
          return 0;
        }
        await runDemo({
          batch: intFlag(flags, 'batch'),
          steps: intFlag(flags, 'steps'),
          vocab: intFlag(flags, 'vocab'),
          seed: intFlag(flags, 'seed'),
          device: flags.device as 'cpu' | 'cuda' | 'auto' | undefined,
        });
        return 0;
      case 'info':
        console.log(JSON.stringify(backendInfo(), null, 2));
        return 0;
      case undefined:
      case 'help':
      case '--help':
      case '-h':
        console.log(HELP);
        return command === undefined ? 2 : 0;
      default:
        console.error(`unknown command '${command}'\n\n${HELP}`);
        return 2;
    }
  } catch (e) {
    if (isPpoMaxError(e)) console.error(`ppo-max: ${e.message} [${e.code}]`);
    else console.error(e);
    return 1;
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then((code) => process.exit(code));
}
