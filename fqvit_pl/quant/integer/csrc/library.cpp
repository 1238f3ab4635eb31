// The fqvit_native operator library: each kernel file adds its operators with
// TORCH_LIBRARY_FRAGMENT(fqvit_native, m) and TORCH_LIBRARY_IMPL(fqvit_native, CPU, m).
#include <torch/library.h>

TORCH_LIBRARY(fqvit_native, m) {}
