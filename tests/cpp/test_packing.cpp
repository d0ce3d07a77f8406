// Calls the packing ops through the dispatcher, as any libtorch user would, and checks them
// against reshape/permute: a round trip, the diffusers token layout, and the argument checks.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what);
    ++failures;
  }
}

at::Tensor patchify(const at::Tensor& x, int64_t p) {
  const int64_t c = x.size(0), h = x.size(1), w = x.size(2);
  return x.reshape({c, h / p, p, w / p, p}).permute({1, 3, 0, 2, 4}).reshape({(h / p) * (w / p), c * p * p});
}

}  // namespace

int main() {
  auto pack = c10::Dispatcher::singleton()
                  .findSchemaOrThrow("uniref::pack_latents", "")
                  .typed<std::tuple<at::Tensor, at::Tensor>(at::TensorList, at::IntArrayRef, int64_t)>();
  auto unpack = c10::Dispatcher::singleton()
                    .findSchemaOrThrow("uniref::unpack_latents", "")
                    .typed<std::vector<at::Tensor>(const at::Tensor&, at::IntArrayRef, int64_t)>();

  std::vector<at::Tensor> images = {at::randn({16, 8, 6}), at::randn({16, 2, 2}), at::randn({16, 4, 10})};
  auto [tokens, pos] = pack.call(images, {2, 1}, 2);
  at::Tensor expected = at::cat({patchify(images[0], 2), patchify(images[1], 2), patchify(images[2], 2)});
  expect(tokens.equal(expected), "tokens match reshape/permute/cat");
  expect(pos.size(0) == 12 + 1 + 10 && pos[12][0].item<int>() == 1 && pos[13][0].item<int>() == 0,
         "position ids restart the image index at each sample");

  std::vector<at::Tensor> back = unpack.call(tokens, {8, 6, 2, 2, 4, 10}, 2);
  bool same = back.size() == images.size();
  for (size_t k = 0; same && k < images.size(); ++k) same = back[k].equal(images[k]);
  expect(same, "unpack is the exact inverse");

  bool threw = false;
  try {
    pack.call({at::randn({16, 3, 4})}, {1}, 2);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("not a positive multiple of patch_size") != std::string::npos;
  }
  expect(threw, "odd spatial sizes raise a clear error");

  std::printf("%s\n", failures == 0 ? "test_packing: all checks passed" : "test_packing: FAILED");
  return failures == 0 ? 0 : 1;
}
