#!/bin/sh
# Builds and runs the kernel self-test with the AVX-VNNI and AVX-512 VNNI kernels compiled against
# the scalar intrinsic emulation in this folder, and the NEON kernel likewise (checks their logic on
# any x86-64 CPU).
# Usage: sh csrc/emu/build_emu_selftest.sh [build-dir]
set -e
here=$(cd "$(dirname "$0")" && pwd); src="$here/.."; out=${1:-/tmp/bitnet_emu}
mkdir -p "$out"
# $1 = build dir; BITNET_EMU_DOTPROD=1 emulates the NEON kernel's dot-product variant.
F="-O1 -std=c++17 -ffp-contract=off -I$src -DBITNET_EMULATE -DBITNET_HAVE_AVXVNNI -DBITNET_HAVE_AVX512VNNI -DBITNET_HAVE_NEON"
for f in kernel_avxvnni kernel_avx512vnni; do ${CXX:-g++} $F -I"$here" -c "$src/$f.cpp" -o "$out/$f.o"; done
D=""; [ "${BITNET_EMU_DOTPROD:-0}" = "1" ] && D="-D__ARM_FEATURE_DOTPROD=1"
${CXX:-g++} $F $D -I"$here" -c "$src/kernel_neon.cpp" -o "$out/kernel_neon.o"
${CXX:-g++} $F -c "$src/kernel_scalar.cpp" -o "$out/kernel_scalar.o"
${CXX:-g++} $F -c "$src/threadpool.cpp" -o "$out/threadpool.o"
for f in api isa driver quantize int8; do ${CXX:-g++} $F -c "$src/$f.cpp" -o "$out/$f.o"; done
${CXX:-g++} $F "$src/selftest.cpp" "$out"/*.o -o "$out/selftest" -lpthread
"$out/selftest"
