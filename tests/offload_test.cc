// Attention offload onto memory nodes: the last M ranks of the job serve
// (runtime/offload/offload_server.h), the others compute. Checked: the offloaded
// attention against the naive float64 reference (out, lse, dq, dk, dv) for
// both layouts, MHA and GQA, 1 or 2 memory nodes; a whole model step with
// offloaded softmax layers equals the same step with ring attention; compute
// ranks receive only their own results; closing frees the nodes' memory; and
// malformed requests, unknown calls and capacity exhaustion get ERROR replies
// while the node keeps serving.
#include <gtest/gtest.h>

#include "distributed_reference.h"
#include "documents_reference.h"
#include "loom/models/hybrid_lm.h"
#include "loom/parallel/softmax_attention/offload_attention.h"
#include "loom/runtime/comm/documents.h"
#include "loom/runtime/comm/mpi_communicator.h"
#include "loom/runtime/offload/offload_protocol.h"

namespace loom {
namespace {

namespace sa = softmax_attention;
using Msg = pb::OffloadMessage;
using testing::ReferenceCheck;
using testing::seeded_randn;

// The job split into compute ranks and M memory nodes (the last M ranks).
struct OffloadWorld {
  CommPtr world, compute;
  std::vector<int> memory_ranks, compute_ranks;
  bool is_memory = false;
};

OffloadWorld split_world(int M) {
  OffloadWorld w;
  w.world = MpiCommunicator::world();
  const int S = w.world->size();
  for (int r = 0; r < S; ++r) (r >= S - M ? w.memory_ranks : w.compute_ranks).push_back(r);
  w.is_memory = w.world->rank() >= S - M;
  w.compute = w.world->split(w.is_memory ? 1 : 0, w.world->rank());
  return w;
}

// Memory ranks serve until every compute rank has shut them down; compute
// ranks run `body` with a client, then shut down (also when body failed).
void run_offloaded(int M, int64_t capacity_bytes, const std::function<void(OffloadWorld&, sa::OffloadClient&)>& body) {
  OffloadWorld w = split_world(M);
  if (w.is_memory) {
    offload::OffloadServer(w.world, w.compute_ranks, capacity_bytes, sa::offload_kernels()).serve();
    return;
  }
  sa::OffloadClient client(w.world, w.memory_ranks, /*group=*/0);
  body(w, client);
  client.shutdown();
}

Msg stats(sa::OffloadClient& client, int node) {
  Msg m;
  m.set_type(Msg::STATS);
  return client.request(node, m, {});
}

class OffloadAttention : public ::testing::TestWithParam<int> {};

TEST_P(OffloadAttention, MatchesNaiveReferenceAndFreesMemory) {
  const int M = GetParam();
  if (MpiCommunicator::world()->size() <= M) GTEST_SKIP() << "needs at least one compute rank besides " << M;
  run_offloaded(M, int64_t(1) << 30, [&](OffloadWorld& w, sa::OffloadClient& client) {
    const int C = w.compute->size(), r = w.compute->rank();
    const int64_t B = 1, d = 4;
    for (auto kind : {LayoutKind::kContiguous, LayoutKind::kZigzag})
      for (auto [hq, hkv] : {std::pair<int64_t, int64_t>{2, 2}, std::pair<int64_t, int64_t>{4, 2}})
        for (int64_t n : {int64_t(6 * C + 1), int64_t(17)}) {
          const SequenceLayout layout(kind, n, C);
          sa::AttentionSpec spec;
          spec.block = 3;
          const at::Tensor Q = seeded_randn({B, hq, n, d}, 100 + n), K = seeded_randn({B, hkv, n, d}, 200 + n),
                           V = seeded_randn({B, hkv, n, d}, 300 + n), G = seeded_randn({B, hq, n, d}, 400 + n);
          at::Tensor Qr = Q.clone().requires_grad_(true), Kr = K.clone().requires_grad_(true),
                     Vr = V.clone().requires_grad_(true);
          auto [ref, ref_lse] = sa::naive_attention(Qr, Kr, Vr, spec);
          (ref * G).sum().backward();

          at::Tensor q = layout.shard(Q, r, 2).requires_grad_(true), k = layout.shard(K, r, 2).requires_grad_(true),
                     v = layout.shard(V, r, 2).requires_grad_(true);
          auto [out, lse] = sa::attention_with_lse(q, k, v, layout, w.compute, sa::SoftmaxMethod::kOffload, spec, &client);
          (out * layout.shard(G, r, 2)).sum().backward();
          EXPECT_TRUE(ReferenceCheck(r, 1e-9)
                          .sharded("out", out, ref, layout, 2)
                          .sharded("lse", lse, ref_lse, layout, 2)
                          .sharded("dq", q.grad(), Qr.grad(), layout, 2)
                          .sharded("dk", k.grad(), Kr.grad(), layout, 2)
                          .sharded("dv", v.grad(), Vr.grad(), layout, 2)
                          .verdict())
              << layout_kind_name(kind) << " hq=" << hq << " n=" << n << " M=" << M;
        }
    // A compute rank receives its own results (out and lse of its chunks) and
    // small control messages, never another rank's K,V: with 64 tokens per
    // rank and d = 32, one rank's K alone outweighs all the control bytes.
    {
      const SequenceLayout layout(LayoutKind::kZigzag, 64 * C, C);
      at::Tensor q = at::randn({1, 2, layout.local_len(), 32}, at::kDouble), k = at::randn_like(q), v = at::randn_like(q);
      const CommStats before = w.world->stats();
      auto [out, lse] = sa::attention_with_lse(q, k, v, layout, w.compute, sa::SoftmaxMethod::kOffload,
                                               sa::AttentionSpec(), &client);
      const CommStats forward = w.world->stats() - before;
      const int64_t own = out.nbytes() + lse.nbytes(), control = forward.total_bytes_received() - own;
      EXPECT_GE(control, 0);
      EXPECT_LT(control, k.nbytes()) << "received " << forward.total_bytes_received() << " bytes, own results " << own;
    }
    // Closing frees every byte on every node.
    client.close_calls(w.compute);
    for (int node = 0; node < M; ++node) {
      const Msg s = stats(client, node);
      EXPECT_EQ(s.bytes_in_use(), 0) << "node " << node;
      EXPECT_EQ(s.calls_open(), 0) << "node " << node;
    }
  });
}

// Packed documents: the memory nodes mask with the query chunks' doc_start
// (sent beside q); the reference is each document run alone with the naive
// attention, outputs concatenated.
TEST_P(OffloadAttention, DocumentsMatchEachDocumentAlone) {
  const int M = GetParam();
  if (MpiCommunicator::world()->size() <= M) GTEST_SKIP() << "needs at least one compute rank besides " << M;
  run_offloaded(M, int64_t(1) << 30, [&](OffloadWorld& w, sa::OffloadClient& client) {
    const int C = w.compute->size(), r = w.compute->rank();
    const int64_t B = 2, d = 4;
    for (auto kind : {LayoutKind::kContiguous, LayoutKind::kZigzag})
      for (auto [hq, hkv] : {std::pair<int64_t, int64_t>{2, 2}, std::pair<int64_t, int64_t>{4, 2}})
        for (int64_t n : {int64_t(6 * C + 1), int64_t(17)}) {
          const SequenceLayout layout(kind, n, C);
          sa::AttentionSpec spec;
          spec.block = 2;
          for (const auto& rows : testing::document_rows(layout, 5 + n)) {
            const at::Tensor Q = seeded_randn({B, hq, n, d}, 100 + n), K = seeded_randn({B, hkv, n, d}, 200 + n),
                             V = seeded_randn({B, hkv, n, d}, 300 + n), G = seeded_randn({B, hq, n, d}, 400 + n);
            at::Tensor Qr = Q.clone().requires_grad_(true), Kr = K.clone().requires_grad_(true),
                       Vr = V.clone().requires_grad_(true);
            const auto ref =
                testing::each_document_alone(rows.lengths, {Qr, Kr, Vr}, 2, [&](const std::vector<at::Tensor>& x) {
                  auto [o, l] = sa::naive_attention(x[0], x[1], x[2], spec);
                  return std::vector<at::Tensor>{o, l};
                });
            (ref[0] * G).sum().backward();

            const at::Tensor doc_start =
                shard_document_starts(document_starts_from_lengths(rows.lengths, n), layout, r);
            at::Tensor q = layout.shard(Q, r, 2).requires_grad_(true), k = layout.shard(K, r, 2).requires_grad_(true),
                       v = layout.shard(V, r, 2).requires_grad_(true);
            auto [out, lse] = sa::attention_with_lse(q, k, v, layout, w.compute, sa::SoftmaxMethod::kOffload, spec,
                                                     &client, doc_start);
            (out * layout.shard(G, r, 2)).sum().backward();
            EXPECT_TRUE(ReferenceCheck(r, 1e-9)
                            .sharded("out", out, ref[0], layout, 2)
                            .sharded("lse", lse, ref[1], layout, 2)
                            .sharded("dq", q.grad(), Qr.grad(), layout, 2)
                            .sharded("dk", k.grad(), Kr.grad(), layout, 2)
                            .sharded("dv", v.grad(), Vr.grad(), layout, 2)
                            .verdict())
                << rows.name << " " << testing::describe_lengths(rows.lengths) << " " << layout_kind_name(kind)
                << " hq=" << hq << " n=" << n << " M=" << M;
          }
        }
    client.close_calls(w.compute);
  });
}

INSTANTIATE_TEST_SUITE_P(MemoryNodes, OffloadAttention, ::testing::Values(1, 2),
                         [](const ::testing::TestParamInfo<int>& info) { return "M" + std::to_string(info.param); });

// A model step with its softmax layers offloaded equals the step with ring
// attention over the same compute ranks (loss and every parameter gradient).
TEST(OffloadModel, StepMatchesRingAttention) {
  for (int M : {1, 2}) {
    if (MpiCommunicator::world()->size() <= M) continue;
    run_offloaded(M, int64_t(1) << 30, [&](OffloadWorld& w, sa::OffloadClient& client) {
      const int C = w.compute->size();
      pb::ModelConfig user;
      user.set_preset("tiny-linear-llama-hybrid");  // L L L A, 2 KV heads
      const auto config = models::resolve_model_config(user);
      torch::manual_seed(4);
      models::HybridLM model(config);
      model->to(at::kDouble);
      const int64_t n = 12 * C;
      at::Generator gen = at::detail::createCPUGenerator(6);
      const at::Tensor tokens = at::randint(0, 256, {2, n + 1}, gen, at::kLong);
      const SequenceLayout layout(LayoutKind::kZigzag, n, C);
      const int r = w.compute->rank();
      const at::Tensor input = layout.shard(tokens.narrow(1, 0, n), r, 1, 0);
      const at::Tensor labels = layout.shard(tokens.narrow(1, 1, n), r, 1, -100);
      auto step = [&](pb::SoftmaxMethod method) {
        pb::ParallelConfig parallel;
        parallel.set_softmax_method(method);
        const auto loss_fn = models::language_model_loss(parallel, &client);
        model->zero_grad();
        at::Tensor loss = loss_fn(*model, Batch{input, labels}, layout, w.compute);
        loss.backward();
        at::Tensor total = loss.detach().reshape({1}).clone();
        w.compute->all_reduce(total)->wait();
        std::vector<at::Tensor> grads{total};
        for (const auto& p : model->parameters()) {
          at::Tensor g = p.grad().clone();
          w.compute->all_reduce(g)->wait();
          grads.push_back(g);
        }
        return grads;
      };
      const auto ring = step(pb::RING), offloaded = step(pb::OFFLOAD);
      ReferenceCheck check(r, 1e-9);
      check.same("loss", offloaded[0], ring[0]);
      for (size_t i = 1; i < ring.size(); ++i) check.same("grad" + std::to_string(i), offloaded[i], ring[i]);
      EXPECT_TRUE(check.verdict()) << "M=" << M;
      client.close_calls(w.compute);
    });
  }
}

// Generation with the KV caches on the memory nodes (Lamina): the same tokens
// as generation without offload, (2 + 2/G) e d payload bytes per token per
// layer, sequences freed at the end, and a full node refusing new sequences.
TEST(OffloadGeneration, SameTokensAndLaminaBytesPerToken) {
  for (int M : {1, 2}) {
    if (MpiCommunicator::world()->size() <= M) continue;
    run_offloaded(M, /*capacity_bytes=*/64 << 10, [&](OffloadWorld& w, sa::OffloadClient& client) {
      pb::ModelConfig user;
      user.set_preset("tiny-linear-llama-hybrid");  // L L L A: d = 32, 4 query heads, 2 KV heads
      const auto config = models::resolve_model_config(user);
      torch::manual_seed(9);
      models::HybridLM model(config);
      model->to(at::kDouble);
      const int r = w.compute->rank();  // every compute rank generates its own sequences
      const std::vector<std::vector<int64_t>> prompts{{72, 101, 108, 108, 111}, {87, 111, 114, 108, 100}};
      const auto local = models::generate_incremental(*model, prompts, 10);
      const auto offloaded = models::generate_incremental(*model, prompts, 10, &client, 100 * r);
      EXPECT_EQ(offloaded, local);
      // One decode step of both sequences: q, k, v out and the output back.
      std::vector<models::DecodeCache> caches;
      models::DecodeContext ctx;
      ctx.offload = &client;
      ctx.sequences = {100 * r + 50, 100 * r + 51};
      torch::NoGradGuard no_grad;
      const int64_t sent = client.payload_bytes_sent(), received = client.payload_bytes_received(),
                    control = client.control_bytes();
      const CommStats before = w.world->stats();
      model->decode_step(at::zeros({2, 1}, at::kLong), caches, ctx);
      const CommStats step = w.world->stats() - before;
      const int64_t e = 8, d = 32, G = 2, per_token = (2 * d + 2 * d / G) * e;  // (2 + 2/G) e d
      const int64_t payload = client.payload_bytes_sent() - sent + client.payload_bytes_received() - received;
      EXPECT_EQ(payload, 2 * per_token);  // two sequences, one full-attention layer
      // The communicator counts exactly those bytes plus the control messages.
      EXPECT_EQ(step.total_bytes_sent() + step.total_bytes_received(), payload + client.control_bytes() - control);
      client.close_sequences(ctx.sequences);
      // A full node refuses new sequences with a named error and stays up.
      try {
        models::generate_incremental(*model, {std::vector<int64_t>(600, 65)}, 1, &client, 100 * r + 70);
        ADD_FAILURE() << "a 600-token cache fit in 64 KiB";
      } catch (const offload::OffloadError& e) {
        EXPECT_NE(std::string(e.what()).find("memory node full"), std::string::npos) << e.what();
      }
      client.close_sequences({100 * r + 70});
      w.compute->barrier()->wait();
      for (int node = 0; node < M; ++node) {
        const Msg st = stats(client, node);
        EXPECT_EQ(st.sequences_open(), 0) << "node " << node;
        EXPECT_EQ(st.bytes_in_use(), 0) << "node " << node;
      }
    });
  }
}

// Bad requests get ERROR replies naming the problem; the node keeps serving.
TEST(OffloadServer, RefusesBadRequestsAndKeepsServing) {
  if (MpiCommunicator::world()->size() < 2) GTEST_SKIP() << "needs a compute rank and a memory node";
  run_offloaded(1, /*capacity_bytes=*/64 << 10, [&](OffloadWorld& w, sa::OffloadClient& client) {
    if (w.compute->rank() != 0) return;  // one client is enough; the others just shut down
    auto refused = [&](Msg m, const std::vector<at::Tensor>& payloads, const std::string& fragment) {
      try {
        client.request(0, m, payloads);
        ADD_FAILURE() << "accepted: " << m.ShortDebugString();
      } catch (const offload::OffloadError& e) {
        EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("memory node (rank " + std::to_string(w.memory_ranks[0])),
                  std::string::npos)
            << e.what();
      }
    };
    Msg m;
    m.set_type(Msg::UNKNOWN);
    refused(m, {}, "is not a request");
    m.set_type(Msg::OK);
    refused(m, {}, "is not a request");
    m.set_type(Msg::ATTEND);
    m.set_call(999);
    refused(m, {at::zeros({1, 2, 4, 4}, at::kDouble)}, "ATTEND for call 999 of group 0: no K,V stored");
    m.set_type(Msg::STORE_KV);
    m.set_call(1);
    refused(m, {at::zeros({1, 2, 64, 64}, at::kDouble), at::zeros({1, 2, 64, 64}, at::kDouble)}, "capacity exceeded");
    refused(m, {at::zeros({1, 2, 4, 4}, at::kLong), at::zeros({1, 2, 4, 4}, at::kLong)}, "dtype 'int64'");
    // Documents: an int64 doc_start [B, L] of the query, last, only beside ATTEND / ATTEND_BACKWARD.
    {
      Msg docs = m;  // STORE_KV
      docs.set_documents(true);
      refused(docs, {at::zeros({1, 2, 4, 4}, at::kDouble), at::zeros({1, 4}, at::kLong)},
              "only ATTEND and ATTEND_BACKWARD carry documents");
      docs.set_type(Msg::ATTEND);
      refused(docs, {at::zeros({1, 2, 4, 4}, at::kDouble), at::zeros({1, 4}, at::kDouble)},
              "payload 1 (doc_start) has dtype 'float64' (allowed: int64)");
      refused(docs, {at::zeros({1, 2, 4, 4}, at::kDouble), at::zeros({1, 3}, at::kLong)},
              "doc_start [1, 3] must be [B, L] of the query [1, 2, 4, 4]");
      refused(docs, {at::zeros({1, 2, 4, 4}, at::kDouble)}, "payload 0 (doc_start) has dtype 'float64'");
    }
    // An oversized payload announced in the control message: refused before it travels.
    {
      Msg big;
      big.set_version(offload::kProtocolVersion);
      big.set_type(Msg::STORE_KV);
      for (int i = 0; i < 2; ++i) {
        auto* s = big.add_payloads();
        s->set_dtype("float64");
        s->add_shape(int64_t(1) << 40);
      }
      offload::send_control(*w.world, w.memory_ranks[0], big);
      const Msg ack = offload::receive_message(*w.world, w.memory_ranks[0], nullptr);
      EXPECT_EQ(ack.type(), Msg::ERROR);
      EXPECT_NE(ack.error().find("larger than"), std::string::npos) << ack.error();
    }
    // A wrong protocol version.
    {
      at::Tensor header = at::tensor({int64_t{99}, int64_t{0}, int64_t{0}}, at::kLong);
      w.world->isend(header, w.memory_ranks[0], offload::kTag)->wait();
      const Msg reply = offload::receive_message(*w.world, w.memory_ranks[0], nullptr);
      EXPECT_EQ(reply.type(), Msg::ERROR);
      EXPECT_NE(reply.error().find("protocol version 99"), std::string::npos) << reply.error();
    }
    // Still serving: a valid store and its statistics.
    m.set_call(2);
    client.request(0, m, {at::ones({1, 2, 4, 4}, at::kDouble), at::ones({1, 2, 4, 4}, at::kDouble)});
    EXPECT_EQ(stats(client, 0).bytes_in_use(), 2 * 32 * 8);
    Msg close;
    close.set_type(Msg::CLOSE);
    close.set_call(2);
    client.request(0, close, {});
    EXPECT_EQ(stats(client, 0).bytes_in_use(), 0);
  });
}

}  // namespace
}  // namespace loom
