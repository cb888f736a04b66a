/** Device choice: where each op runs. */
import { PpoMaxError, invalidArgument } from './errors';
import { native, loadNative } from './native';

/** 'cpu' always works; 'cuda' needs a CUDA build and a GPU; 'auto' picks CUDA when usable. */
export type Device = 'cpu' | 'cuda' | 'auto';

/** True when this build of ppo-max contains the CUDA backend. */
export function cudaCompiled(): boolean {
  return native().cudaCompiled();
}

/** True when a CUDA device can be used now (CUDA compiled in, driver and GPU present). */
export function cudaAvailable(): boolean {
  return native().cudaAvailable();
}

/** Facts about the loaded backend, for logs and bug reports. */
export function backendInfo(): {
  addonPath: string;
  cudaCompiled: boolean;
  cudaAvailable: boolean;
  cudaUnavailableReason: string;
  cpuThreads: number;
} {
  const { addon, path } = loadNative();
  return {
    addonPath: path,
    cudaCompiled: addon.cudaCompiled(),
    cudaAvailable: addon.cudaAvailable(),
    cudaUnavailableReason: addon.cudaUnavailableReason(),
    cpuThreads: addon.cpuThreads(),
  };
}

/**
 * Resolves a device option to the backend that will run: 'auto' (the default) falls
 * back to the CPU; 'cuda' throws ERR_CUDA_UNAVAILABLE, with the reason, when it can't run.
 */
export function resolveDevice(device: Device | undefined): 'cpu' | 'cuda' {
  const d = device ?? 'auto';
  if (d === 'cpu') return 'cpu';
  if (d === 'auto') return cudaAvailable() ? 'cuda' : 'cpu';
  if (d === 'cuda') {
    if (!cudaAvailable()) {
      throw new PpoMaxError(
        'ERR_CUDA_UNAVAILABLE',
        `device 'cuda' was requested but CUDA cannot be used: ${native().cudaUnavailableReason()}`,
        'device',
      );
    }
    return 'cuda';
  }
  throw invalidArgument('device', `device must be 'cpu', 'cuda' or 'auto', got ${JSON.stringify(device)}`);
}
