#include "loom/runtime/train/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <sstream>

#include "loom/runtime/core/dtypes.h"
#include "loom/runtime/core/error.h"
#include "loom/runtime/data/token_file.h"

namespace loom {
namespace fs = std::filesystem;
namespace {

std::string step_name(int64_t step) {
  std::ostringstream s;
  s << "step-" << std::setw(8) << std::setfill('0') << step;
  return s.str();
}

void fsync_path(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

at::ScalarType dtype_from_name(const std::string& name, const std::string& file) {
  if (auto t = scalar_type_from_name(name)) return *t;
  throw LoomError("checkpoint '" + file + "': unknown dtype '" + name + "'");
}
std::string dtype_name(at::ScalarType t) {
  if (auto name = scalar_type_name(t)) return *name;
  throw LoomError(std::string("checkpoint: cannot store dtype ") + c10::toString(t));
}

}  // namespace

std::string save_checkpoint(const std::string& dir, const CheckpointData& data, int64_t keep) {
  const std::string name = step_name(data.manifest.step());
  const fs::path final_dir = fs::path(dir) / name, tmp_dir = fs::path(dir) / (name + ".tmp");
  std::error_code ec;
  fs::create_directories(dir, ec);
  fs::remove_all(tmp_dir, ec);
  if (!fs::create_directories(tmp_dir, ec) && ec)
    throw LoomError("checkpoint: cannot create '" + tmp_dir.string() + "': " + ec.message());

  pb::CheckpointManifest manifest = data.manifest;
  manifest.set_version(1);
  manifest.set_state_file("state.bin");
  manifest.clear_tensors();
  const fs::path state_path = tmp_dir / "state.bin";
  // Fault injection: die halfway through writing this step's state.
  const char* kill_env = std::getenv("LOOM_FAULT_KILL_DURING_SAVE");
  const bool kill_now = kill_env != nullptr && std::atoll(kill_env) == data.manifest.step();
  uint64_t total = 0;
  for (const auto& entry : data.tensors) total += entry.second.nbytes();
  const int64_t kill_after = kill_now ? static_cast<int64_t>(total / 2) : -1;
  uint64_t offset = 0, checksum = 1469598103934665603ull;
  {
    std::ofstream out(state_path, std::ios::binary | std::ios::trunc);
    if (!out) throw LoomError("checkpoint: cannot write '" + state_path.string() + "': " + std::strerror(errno));
    for (const auto& [tname, tensor] : data.tensors) {
      const at::Tensor t = tensor.detach().contiguous().cpu();
      auto* entry = manifest.add_tensors();
      entry->set_name(tname);
      entry->set_dtype(dtype_name(t.scalar_type()));
      for (auto s : t.sizes()) entry->add_shape(s);
      entry->set_offset(offset);
      entry->set_bytes(t.nbytes());
      const char* bytes = static_cast<const char*>(t.data_ptr());
      if (kill_after >= 0 && static_cast<int64_t>(offset + t.nbytes()) > kill_after) {
        out.write(bytes, std::max<int64_t>(0, kill_after - static_cast<int64_t>(offset)));
        out.flush();
        std::raise(SIGKILL);  // fault injection: die mid-save
      }
      out.write(bytes, static_cast<std::streamsize>(t.nbytes()));
      checksum = fnv1a64(bytes, t.nbytes(), checksum);
      offset += t.nbytes();
    }
    out.flush();
    if (!out) throw LoomError("checkpoint: writing '" + state_path.string() + "' failed (disk full?)");
  }
  fsync_path(state_path.string());
  manifest.set_state_bytes(offset);
  manifest.set_state_checksum(checksum);
  {
    std::ofstream out(tmp_dir / "manifest.pb", std::ios::binary | std::ios::trunc);
    if (!manifest.SerializeToOstream(&out) || !out.flush())
      throw LoomError("checkpoint: writing the manifest in '" + tmp_dir.string() + "' failed");
  }
  fsync_path((tmp_dir / "manifest.pb").string());
  fs::remove_all(final_dir, ec);
  fs::rename(tmp_dir, final_dir, ec);
  if (ec) throw LoomError("checkpoint: renaming '" + tmp_dir.string() + "' failed: " + ec.message());
  fsync_path(dir);

  // Keep the newest `keep` complete checkpoints.
  std::vector<fs::path> complete;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_directory() && e.path().filename().string().rfind("step-", 0) == 0 &&
        e.path().extension() != ".tmp")
      complete.push_back(e.path());
  std::sort(complete.begin(), complete.end());
  for (size_t i = 0; keep > 0 && i + static_cast<size_t>(keep) < complete.size(); ++i) fs::remove_all(complete[i], ec);
  return final_dir.string();
}

std::optional<std::string> latest_checkpoint(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return std::nullopt;
  std::vector<std::string> complete;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (e.is_directory() && name.rfind("step-", 0) == 0 && name.find(".tmp") == std::string::npos &&
        fs::exists(e.path() / "manifest.pb"))
      complete.push_back(e.path().string());
  }
  if (complete.empty()) return std::nullopt;
  return *std::max_element(complete.begin(), complete.end());
}

CheckpointData load_checkpoint(const std::string& path) {
  const fs::path manifest_path = fs::path(path) / "manifest.pb";
  CheckpointData data;
  {
    std::ifstream in(manifest_path, std::ios::binary);
    if (!in) throw LoomError("checkpoint '" + manifest_path.string() + "': cannot open");
    if (!data.manifest.ParseFromIstream(&in))
      throw LoomError("checkpoint '" + manifest_path.string() + "': manifest does not parse (corrupt)");
  }
  const fs::path state_path = fs::path(path) / data.manifest.state_file();
  std::ifstream in(state_path, std::ios::binary | std::ios::ate);
  if (!in) throw LoomError("checkpoint '" + state_path.string() + "': cannot open");
  const uint64_t size = static_cast<uint64_t>(in.tellg());
  if (size != data.manifest.state_bytes())
    throw LoomError("checkpoint '" + state_path.string() + "' is " + std::to_string(size) + " bytes, the manifest says " +
                    std::to_string(data.manifest.state_bytes()) + " (truncated or corrupt): refusing to load it");
  std::vector<char> bytes(size);
  in.seekg(0);
  in.read(bytes.data(), static_cast<std::streamsize>(size));
  if (fnv1a64(bytes.data(), bytes.size()) != data.manifest.state_checksum())
    throw LoomError("checkpoint '" + state_path.string() + "': checksum mismatch (corrupt): refusing to load it");
  for (const auto& e : data.manifest.tensors()) {
    std::vector<int64_t> shape(e.shape().begin(), e.shape().end());
    at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype_from_name(e.dtype(), state_path.string())));
    if (e.offset() + e.bytes() > size || e.bytes() != t.nbytes())
      throw LoomError("checkpoint '" + state_path.string() + "': entry '" + e.name() + "' is out of range");
    std::memcpy(t.data_ptr(), bytes.data() + e.offset(), e.bytes());
    data.tensors.emplace_back(e.name(), t);
  }
  return data;
}

}  // namespace loom
