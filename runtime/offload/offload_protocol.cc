#include "loom/runtime/offload/offload_protocol.h"

#include <cstring>
#include <limits>

#include "loom/runtime/core/dtypes.h"

namespace loom::offload {
namespace {

at::Tensor header_tensor() { return at::zeros({3}, at::kLong); }

}  // namespace

const char* type_name(pb::OffloadMessage::Type type) {
  const std::string& name = pb::OffloadMessage::Type_Name(type);
  return name.empty() ? "UNKNOWN" : name.c_str();
}

pb::OffloadTensorSpec spec_of(const at::Tensor& t) {
  pb::OffloadTensorSpec s;
  const auto name = scalar_type_name(t.scalar_type());
  TORCH_CHECK(name, "offload: cannot send dtype ", t.scalar_type());
  s.set_dtype(*name);
  for (int64_t d : t.sizes()) s.add_shape(d);
  return s;
}

int64_t payload_bytes(const pb::OffloadMessage& msg, int64_t limit_bytes) {
  if (msg.payloads_size() > kMaxPayloads)
    throw OffloadError(std::to_string(msg.payloads_size()) + " payloads (at most " + std::to_string(kMaxPayloads) + ")");
  int64_t total = 0;
  for (int i = 0; i < msg.payloads_size(); ++i) {
    const auto& s = msg.payloads(i);
    const auto dtype = scalar_type_from_name(s.dtype());
    const bool doc_start = msg.documents() && i == msg.payloads_size() - 1;
    if (doc_start && (!dtype || *dtype != at::kLong))
      throw OffloadError("payload " + std::to_string(i) + " (doc_start) has dtype '" + s.dtype() +
                         "' (allowed: int64)");
    if (!doc_start && (!dtype || !at::isFloatingType(*dtype)))
      throw OffloadError("payload " + std::to_string(i) + " has dtype '" + s.dtype() +
                         "' (allowed: float32, float64, bfloat16, float16)");
    if (s.shape_size() > 8) throw OffloadError("payload " + std::to_string(i) + " has more than 8 dimensions");
    int64_t elements = 1;
    for (int64_t d : s.shape()) {
      if (d < 0 || (d > 0 && elements > limit_bytes / d))
        throw OffloadError("payload " + std::to_string(i) + " shape is negative or larger than " +
                           std::to_string(limit_bytes) + " bytes");
      elements *= d;
    }
    total += elements * static_cast<int64_t>(c10::elementSize(*dtype));
    if (total > limit_bytes)
      throw OffloadError("payloads of " + std::to_string(total) + "+ bytes exceed the limit of " +
                         std::to_string(limit_bytes) + " bytes");
  }
  return total;
}

int64_t send_control(Communicator& comm, int peer, const pb::OffloadMessage& msg) {
  std::string bytes;
  TORCH_CHECK(msg.SerializeToString(&bytes), "offload: cannot serialize a control message");
  at::Tensor header = at::tensor({int64_t{kProtocolVersion}, static_cast<int64_t>(bytes.size()),
                                  static_cast<int64_t>(msg.payloads_size())},
                                 at::kLong);
  at::Tensor control = at::empty({static_cast<int64_t>(bytes.size())}, at::kByte);
  std::memcpy(control.data_ptr(), bytes.data(), bytes.size());
  auto h = comm.isend(header, peer, kTag);
  auto c = comm.isend(control, peer, kTag + 1);
  h->wait();
  c->wait();
  return static_cast<int64_t>(header.nbytes() + control.nbytes());
}

WorkPtr post_header(Communicator& comm, int peer, at::Tensor& header) {
  header = header_tensor();
  return comm.irecv(header, peer, kTag);
}

pb::OffloadMessage receive_control(Communicator& comm, int peer, const at::Tensor& header) {
  const int64_t version = header[0].item<int64_t>(), bytes = header[1].item<int64_t>();
  if (version != kProtocolVersion)
    throw OffloadError("protocol version " + std::to_string(version) + " (this node speaks " +
                       std::to_string(kProtocolVersion) + ")");
  if (bytes < 0 || bytes > kMaxControlBytes)
    throw OffloadError("control message of " + std::to_string(bytes) + " bytes (at most " +
                       std::to_string(kMaxControlBytes) + ")");
  at::Tensor control = at::empty({bytes}, at::kByte);
  comm.irecv(control, peer, kTag + 1)->wait();
  pb::OffloadMessage msg;
  if (!msg.ParseFromArray(control.data_ptr(), static_cast<int>(bytes)))
    throw OffloadError("control message does not parse");
  if (msg.version() != kProtocolVersion)
    throw OffloadError("control message version " + std::to_string(msg.version()));
  if (header[2].item<int64_t>() != msg.payloads_size())
    throw OffloadError("header announces " + std::to_string(header[2].item<int64_t>()) + " payloads, control " +
                       std::to_string(msg.payloads_size()));
  return msg;
}

void send_payloads(Communicator& comm, int peer, const std::vector<at::Tensor>& payloads) {
  std::vector<WorkPtr> works;
  for (size_t i = 0; i < payloads.size(); ++i)
    works.push_back(comm.isend(payloads[i].contiguous(), peer, kTag + 2 + static_cast<int>(i)));
  for (auto& w : works) w->wait();
}

std::vector<at::Tensor> receive_payloads(Communicator& comm, int peer, const pb::OffloadMessage& msg) {
  std::vector<at::Tensor> out;
  std::vector<WorkPtr> works;
  for (int i = 0; i < msg.payloads_size(); ++i) {
    const auto& s = msg.payloads(i);
    out.push_back(at::empty(std::vector<int64_t>(s.shape().begin(), s.shape().end()),
                            at::TensorOptions().dtype(*scalar_type_from_name(s.dtype()))));
    works.push_back(comm.irecv(out.back(), peer, kTag + 2 + i));
  }
  for (auto& w : works) w->wait();
  return out;
}

void send_message(Communicator& comm, int peer, pb::OffloadMessage msg, const std::vector<at::Tensor>& payloads) {
  msg.set_version(kProtocolVersion);
  msg.clear_payloads();
  for (const auto& t : payloads) *msg.add_payloads() = spec_of(t);
  send_control(comm, peer, msg);
  send_payloads(comm, peer, payloads);
}

pb::OffloadMessage receive_message(Communicator& comm, int peer, std::vector<at::Tensor>* payloads,
                                   int64_t* control_bytes) {
  at::Tensor header;
  post_header(comm, peer, header)->wait();
  if (control_bytes) *control_bytes = static_cast<int64_t>(header.nbytes()) + header[1].item<int64_t>();
  pb::OffloadMessage msg = receive_control(comm, peer, header);
  payload_bytes(msg, std::numeric_limits<int64_t>::max() / 2);  // validates the specs
  std::vector<at::Tensor> received = receive_payloads(comm, peer, msg);
  if (payloads) *payloads = std::move(received);
  return msg;
}

}  // namespace loom::offload
