// Looking up the registered ops that the C++ autograd Functions call below autograd.
#pragma once

#include <string>

#include <ATen/core/dispatch/Dispatcher.h>

namespace dfs_kernels {

// The compiled backends whose ops share one C++ autograd formula per family.
enum class Prefix { kAten, kCudnn };

inline std::string prefix_name(Prefix prefix) {
  return prefix == Prefix::kAten ? "" : "cudnn_";
}

// dfs_kernels::<name>, typed; the schema is in csrc/registration.cpp.
template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const std::string& name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(("dfs_kernels::" + name).c_str(), "").typed<Signature>();
}

}  // namespace dfs_kernels
