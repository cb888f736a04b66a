{
  "targets": [
    {
      "target_name": "ppo_max",
      "sources": [
        "csrc/core/device.cpp",
        "csrc/core/error.cpp",
        "csrc/core/json.cpp",
        "csrc/core/ops.cpp",
        "csrc/core/thread_pool.cpp",
        "csrc/core/validate.cpp",
        "csrc/cpu/advantages.cpp",
        "csrc/cpu/attention.cpp",
        "csrc/cpu/backend.cpp",
        "csrc/cpu/engine_ops.cpp",
        "csrc/cpu/layers.cpp",
        "csrc/cpu/llama_layers.cpp",
        "csrc/cpu/logprobs.cpp",
        "csrc/cpu/losses.cpp",
        "csrc/cpu/matmul.cpp",
        "csrc/cpu/optimizer.cpp",
        "csrc/cpu/rewards.cpp",
        "csrc/model/checkpoint.cpp",
        "csrc/model/config.cpp",
        "csrc/model/gpt.cpp",
        "csrc/model/params.cpp",
        "csrc/model/sampling.cpp",
        "csrc/trainer/common.cpp",
        "csrc/trainer/ppo.cpp",
        "csrc/trainer/supervised.cpp",
        "csrc/core/cuda_absent.cpp",
        "csrc/addon/addon.cpp",
        "csrc/addon/convert.cpp",
        "csrc/addon/model_bindings.cpp",
        "csrc/addon/ops_bindings.cpp",
        "csrc/addon/trainer_bindings.cpp"
      ],
      "include_dirs": [
        "<!(node -p \"require('node-addon-api').include_dir\")",
        "csrc"
      ],
      "defines": [
        "NAPI_VERSION=8",
        "NAPI_CPP_EXCEPTIONS"
      ],
      "cflags!": [
        "-fno-exceptions"
      ],
      "cflags_cc!": [
        "-fno-exceptions",
        "-fno-rtti",
        "-std=gnu++17",
        "-std=gnu++20"
      ],
      "cflags_cc": [
        "-std=c++17",
        "-O3",
        "-Wall",
        "-Wextra",
        "-Wno-unused-parameter",
        "-fno-trapping-math",
        "-fno-math-errno"
      ],
      "xcode_settings": {
        "GCC_ENABLE_CPP_EXCEPTIONS": "YES",
        "CLANG_CXX_LANGUAGE_STANDARD": "c++17",
        "MACOSX_DEPLOYMENT_TARGET": "11.0"
      },
      "msvs_settings": {
        "VCCLCompilerTool": {
          "ExceptionHandling": 1
        }
      }
    }
  ]
}
