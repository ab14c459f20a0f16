// The main() of every test binary. --isa=<variant> (the per-variant runs in tests/CMakeLists.txt) or
// MLA_TEST_ISA=<variant> forces that kernel variant through MLA_CPU_ISA before any test runs; when this CPU cannot
// run the variant (forcing it would throw, by design: src/cpu/kernels.hpp) the run prints gtest's "[  SKIPPED ]"
// marker, which CTest reports as skipped. --bf16-operands makes the bf16 layer and ops take the native-bf16 path
// (bf16 operands to oneDNN) on any CPU.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "cpu/kernels.hpp"

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  const char* want = std::getenv("MLA_TEST_ISA");
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]).rfind("--isa=", 0) == 0) want = argv[i] + 6;
    // The bf16-operand path of a native-bf16 CPU, through oneDNN's emulation here (cpu::bf16_operands).
    if (std::string(argv[i]) == "--bf16-operands") setenv("MLA_TEST_BF16_OPERANDS", "1", 1);
  }
  if (want && *want) {
    using mla::cpu::Isa;
    bool known = false;
    for (Isa v : {Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2, Isa::Scalar}) known |= mla::cpu::isa_name(v) == want;
    if (!known) {
      std::fprintf(stderr, "MLA_TEST_ISA=%s names no kernel variant\n", want);
      return 1;
    }
    std::string runs;
    bool runnable = false;
    for (Isa v : mla::cpu::supported_isas()) {
      runnable |= mla::cpu::isa_name(v) == want;
      runs += (runs.empty() ? "" : ", ") + std::string(mla::cpu::isa_name(v));
    }
    if (!runnable) {
      std::printf("[  SKIPPED ] this CPU cannot run the %s kernel variant (it runs %s)\n", want, runs.c_str());
      return 0;
    }
    setenv("MLA_CPU_ISA", want, 1);
    std::printf("kernel variant forced: %s\n", want);
  }
  return RUN_ALL_TESTS();
}
