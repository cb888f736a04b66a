// Hugging Face-compatible GPT-2 checkpoints: safetensors reading/writing and the mapping
// between Hugging Face's tensor names/layout and the flat parameter buffer (see
// checkpoint.h for the contract).
//
// safetensors: [u64 little-endian N][N bytes of JSON header][data section]. The header
// maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (byte
// offsets relative to the data section), plus an optional "__metadata__" string map.
// As the reference implementation does, the tensors must tile the data section exactly:
// sorted by offset they start at 0, each begins where the previous ends, the last ends
// at the end of the file, and each spans numel * dtype-size bytes. Anything else is a
// corrupt (or truncated) file.
//
// Error codes and arguments:
//   NotFound     a missing directory or file: its path;
//   IoError      a failed open/read/write/fsync/rename/mkdir: the file's path;
//   CorruptFile  a truncated file, a bad safetensors header (whichever tensor entry is
//                at fault: the message names it), a config.json or index that is not a
//                JSON object: the file's path;
//   InvalidArgument / ShapeMismatch / NonFinite about a tensor: the tensor as written in
//                the file (with or without the "transformer." prefix); a missing tensor:
//                its canonical name (no prefix, as in ParameterLayout); config/tensor
//                disagreements: the config field.
//
// I/O uses POSIX calls (pread, fsync, rename, mkdir): the package targets Linux and
// macOS. Data is read and written little-endian, the byte order of every supported host.
#include "model/checkpoint.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>
#include <unordered_map>
#include <unordered_set>

#include "core/error.h"
#include "core/json.h"
#include "core/thread_pool.h"

#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__)
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "checkpoint.cpp reads and writes safetensors data in the host byte order, "
              "which must be little-endian");
#endif

namespace ppo::model {
namespace {

// The reference implementation's limit on the header size (100 MB): a larger length
// field means a corrupt or hostile file, not a model.
constexpr uint64_t kMaxHeaderBytes = 100000000;
// config.json and the shard index are small; anything larger is not one.
constexpr uint64_t kMaxJsonFileBytes = 100000000;

const char* const kConfigFile = "config.json";
const char* const kWeightsFile = "model.safetensors";
const char* const kIndexFile = "model.safetensors.index.json";
const char* const kPrefix = "transformer.";

// ================================ files ==================================================

std::string join_path(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

std::string errno_text(int err) { return std::strerror(err); }

// A failed read or write (permissions, disk full, I/O error): IoError naming the file.
[[noreturn]] void io_error(const std::string& path, const std::string& what, int err) {
  throw Error(ErrorCode::IoError, path + ": " + what + ": " + errno_text(err), path);
}

// A file that exists but is not a valid safetensors file: CorruptFile naming the file
// (the message names the tensor when one is to blame).
[[noreturn]] void corrupt(const std::string& path, const std::string& what) {
  throw Error(ErrorCode::CorruptFile, path + ": corrupt safetensors file: " + what, path);
}

bool is_directory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

// An owned file descriptor.
class File {
 public:
  File() = default;
  explicit File(int fd) : fd_(fd) {}
  File(File&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  File& operator=(File&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = o.fd_;
      o.fd_ = -1;
    }
    return *this;
  }
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  ~File() { reset(); }
  int get() const { return fd_; }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  // close() with its error reported (a failed close can mean lost written data).
  int close_checked() {
    const int fd = fd_;
    fd_ = -1;
    return fd >= 0 ? ::close(fd) : 0;
  }

 private:
  int fd_ = -1;
};

File open_for_reading(const std::string& path, uint64_t& size) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    const int err = errno;
    if (err == ENOENT || err == ENOTDIR)
      throw Error(ErrorCode::NotFound, path + ": no such file", path);
    io_error(path, "cannot access the file", err);
  }
  if (!S_ISREG(st.st_mode))
    throw Error(ErrorCode::NotFound, path + ": not a regular file (a directory?)", path);
  int fd;
  do {
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) io_error(path, "cannot open the file", errno);
  File f(fd);
  if (::fstat(fd, &st) != 0) io_error(path, "cannot stat the file", errno);
  size = static_cast<uint64_t>(st.st_size);
  return f;
}

// Reads exactly n bytes at `offset`. The header validation has already checked that
// they lie within the file, so a short read means the file shrank while being read.
void read_exact(int fd, void* buf, uint64_t n, uint64_t offset, const std::string& path) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(n, uint64_t(1) << 30));
    const ssize_t r = ::pread(fd, p, chunk, static_cast<off_t>(offset));
    if (r < 0) {
      if (errno == EINTR) continue;
      io_error(path, "read failed", errno);
    }
    if (r == 0) corrupt(path, "truncated (the file ended while reading at byte " +
                                  std::to_string(offset) + ")");
    p += r;
    n -= static_cast<uint64_t>(r);
    offset += static_cast<uint64_t>(r);
  }
}

std::string read_text_file(const std::string& path) {
  uint64_t size = 0;
  File f = open_for_reading(path, size);
  require(size <= kMaxJsonFileBytes, ErrorCode::CorruptFile,
          path + ": file too large (" + std::to_string(size) + " bytes) for a JSON file", path);
  std::string text(static_cast<size_t>(size), '\0');
  read_exact(f.get(), text.data(), size, 0, path);
  return text;
}

void write_all(int fd, const void* buf, size_t n, const std::string& path) {
  const char* p = static_cast<const char*>(buf);
  while (n > 0) {
    const size_t chunk = std::min<size_t>(n, size_t(1) << 30);
    const ssize_t w = ::write(fd, p, chunk);
    if (w < 0) {
      if (errno == EINTR) continue;
      io_error(path, "write failed", errno);
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
}

// mkdir -p.
void make_directories(const std::string& dir) {
  require(!dir.empty(), ErrorCode::InvalidArgument, "checkpoint directory must not be empty", "dir");
  size_t pos = 0;
  for (;;) {
    pos = dir.find('/', pos + 1);
    const std::string prefix = dir.substr(0, pos);
    if (!prefix.empty() && !is_directory(prefix) && ::mkdir(prefix.c_str(), 0777) != 0) {
      const int err = errno;
      if (err != EEXIST) io_error(dir, "cannot create the directory '" + prefix + "'", err);
      if (!is_directory(prefix))
        throw Error(ErrorCode::IoError,
                    dir + ": cannot create the directory: '" + prefix +
                        "' exists and is not a directory",
                    dir);
    }
    if (pos == std::string::npos) break;
  }
}

// Writes `path` atomically: everything goes to "<path>.tmp-<pid>-<n>" in the same
// directory, which is fsync'ed and then renamed over `path` (then the directory is
// fsync'ed so the rename itself is durable). Until commit() the old file is untouched;
// an exception or a destruction before commit() removes the temporary file.
class AtomicWriter {
 public:
  explicit AtomicWriter(const std::string& path) : path_(path) {
    static std::atomic<uint64_t> counter{0};
    tmp_ = path + ".tmp-" + std::to_string(static_cast<long long>(::getpid())) + "-" +
           std::to_string(counter.fetch_add(1));
    int fd;
    do {
      fd = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_TRUNC | O_CLOEXEC, 0666);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) io_error(path_, "cannot create the temporary file '" + tmp_ + "'", errno);
    file_ = File(fd);
  }
  AtomicWriter(const AtomicWriter&) = delete;
  AtomicWriter& operator=(const AtomicWriter&) = delete;
  ~AtomicWriter() {
    if (!committed_) {
      file_.reset();
      ::unlink(tmp_.c_str());
    }
  }

  void write(const void* data, size_t n) { write_all(file_.get(), data, n, path_); }

  void commit() {
    if (::fsync(file_.get()) != 0) io_error(path_, "fsync failed", errno);
    if (file_.close_checked() != 0) io_error(path_, "close failed", errno);
    if (::rename(tmp_.c_str(), path_.c_str()) != 0)
      io_error(path_, "cannot rename '" + tmp_ + "' over it", errno);
    committed_ = true;
    // Make the rename durable. Some file systems refuse fsync on a directory; the data
    // itself is already safe then, so that is not an error.
    const size_t slash = path_.rfind('/');
    const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path_.substr(0, slash));
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_CLOEXEC);
    if (dfd >= 0) {
      (void)::fsync(dfd);
      ::close(dfd);
    }
  }

 private:
  std::string path_, tmp_;
  File file_;
  bool committed_ = false;
};

// ================================ dtypes =================================================

// Bytes per element of the safetensors dtypes, 0 for an unknown name.
uint64_t dtype_size(const std::string& dtype) {
  static const std::unordered_map<std::string, uint64_t> sizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
      {"U32", 4},  {"F32", 4}, {"I64", 8}, {"U64", 8},     {"F64", 8}};
  const auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

bool is_float_dtype(const std::string& dtype) {
  return dtype == "F32" || dtype == "F16" || dtype == "BF16" || dtype == "F64";
}

// IEEE binary16 -> float32, exact (subnormals, infinities and NaN included).
float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);  // inf / NaN (payload kept)
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);  // rebias 15 -> 127
  } else if (mant == 0) {
    bits = sign;  // +-0
  } else {
    // Subnormal: mant * 2^-24. Normalize: shift until the implicit bit (0x400) is set.
    int e = -1;
    do {
      mant <<= 1;
      ++e;
    } while ((mant & 0x400u) == 0);
    bits = sign | static_cast<uint32_t>(112 - e) << 23 | ((mant & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// double -> float32, rounding to nearest. The C++ cast is undefined for a value beyond
// the float range, so those become the infinity IEEE rounding gives (and are then
// reported as non-finite): FLT_MAX + half an ulp (2^103) and above rounds to infinity.
float f64_to_float(double d) {
  constexpr double kOverflow = 3.4028234663852886e38 + 10141204801825835211973625643008.0;
  if (d >= kOverflow) return std::numeric_limits<float>::infinity();
  if (d <= -kOverflow) return -std::numeric_limits<float>::infinity();
  return static_cast<float>(d);  // NaN stays NaN
}

// dst[c * R + r] = src[r * C + c]: src is [R, C], dst is [C, R]. Tiled so both sides
// move through cache lines; threads take disjoint bands of dst rows (no reduction, so
// the result does not depend on the thread count).
void transpose(const float* src, int64_t R, int64_t C, float* dst) {
  constexpr int64_t kTile = 32;
  const int64_t bands = (C + kTile - 1) / kTile;
  parallel_for(bands, [&](int64_t b0, int64_t b1) {
    for (int64_t band = b0; band < b1; ++band) {
      const int64_t c0 = band * kTile, c1 = std::min(C, c0 + kTile);
      for (int64_t r0 = 0; r0 < R; r0 += kTile) {
        const int64_t r1 = std::min(R, r0 + kTile);
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t r = r0; r < r1; ++r) dst[c * R + r] = src[r * C + c];
      }
    }
  }, grain_for(kTile * R));
}

// The index of the first non-finite element of x[0, n), or -1.
int64_t first_non_finite(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return i;
  return -1;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// ================================ safetensors header =====================================

struct HeaderInfo {
  std::vector<SafetensorsTensor> tensors;  // in header order
  uint64_t data_start = 0;                 // 8 + N
};

uint64_t read_le64(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// A non-negative JSON integer, or a corrupt-file error naming `what`.
uint64_t header_uint(const json::Value& v, const std::string& path, const std::string& tensor,
                     const char* what) {
  if (!v.is_integer() || v.as_int64() < 0)
    corrupt(path, "tensor '" + tensor + "': " + what + " must be non-negative integers");
  return static_cast<uint64_t>(v.as_int64());
}

HeaderInfo parse_header(int fd, uint64_t file_size, const std::string& path) {
  if (file_size < 8)
    corrupt(path, "the file has " + std::to_string(file_size) +
                      " bytes, fewer than the 8-byte header length (truncated?)");
  unsigned char len_bytes[8];
  read_exact(fd, len_bytes, 8, 0, path);
  const uint64_t n = read_le64(len_bytes);
  if (n > file_size - 8)
    corrupt(path, "the header length " + std::to_string(n) + " exceeds the file size " +
                      std::to_string(file_size) + " (truncated?)");
  if (n > kMaxHeaderBytes)
    corrupt(path, "the header length " + std::to_string(n) + " exceeds the 100 MB limit");
  if (n < 2) corrupt(path, "the header length " + std::to_string(n) + " is too small");
  std::string text(static_cast<size_t>(n), '\0');
  read_exact(fd, text.data(), n, 8, path);

  json::Value root;
  try {
    root = json::parse(text, path);
  } catch (const Error& e) {
    if (e.code() != ErrorCode::InvalidArgument) throw;
    corrupt(path, std::string("the header is not valid JSON: ") + e.what());
  }
  if (!root.is_object()) corrupt(path, "the header is not a JSON object");

  HeaderInfo info;
  info.data_start = 8 + n;
  const uint64_t data_size = file_size - info.data_start;
  for (size_t k = 0; k < root.size(); ++k) {
    const std::string& name = root.keys()[k];
    const json::Value& entry = root.values()[k];
    if (name == "__metadata__") {
      if (!entry.is_object()) corrupt(path, "__metadata__ is not an object");
      for (const json::Value& m : entry.values())
        if (!m.is_string()) corrupt(path, "__metadata__ values must be strings");
      continue;
    }
    if (!entry.is_object()) corrupt(path, "tensor '" + name + "': entry is not an object");
    const json::Value* dtype = entry.find("dtype");
    const json::Value* shape = entry.find("shape");
    const json::Value* offsets = entry.find("data_offsets");
    if (!dtype || !dtype->is_string())
      corrupt(path, "tensor '" + name + "': missing or non-string \"dtype\"");
    if (!shape || !shape->is_array())
      corrupt(path, "tensor '" + name + "': missing or non-array \"shape\"");
    if (!offsets || !offsets->is_array() || offsets->size() != 2)
      corrupt(path, "tensor '" + name + "': \"data_offsets\" must be [begin, end]");

    SafetensorsTensor t;
    t.name = name;
    t.dtype = dtype->as_string();
    const uint64_t esize = dtype_size(t.dtype);
    if (esize == 0)
      throw Error(ErrorCode::InvalidArgument,
                  path + ": tensor '" + name + "' has an unknown dtype \"" + t.dtype + "\"", name);
    // numel * esize without overflow (a hostile shape could overflow 64 bits).
    uint64_t bytes = esize;
    for (const json::Value& d : shape->values()) {
      const uint64_t dim = header_uint(d, path, name, "shape dimensions");
      if (dim != 0 && bytes > std::numeric_limits<uint64_t>::max() / dim)
        corrupt(path, "tensor '" + name + "': the shape is too large");
      bytes *= dim;
      if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        corrupt(path, "tensor '" + name + "': the shape is too large");
      t.shape.push_back(static_cast<int64_t>(dim));
    }
    t.begin = header_uint((*offsets)[0], path, name, "data_offsets");
    t.end = header_uint((*offsets)[1], path, name, "data_offsets");
    if (t.end < t.begin)
      corrupt(path, "tensor '" + name + "': data_offsets end " + std::to_string(t.end) +
                        " < begin " + std::to_string(t.begin));
    if (t.end - t.begin != bytes)
      corrupt(path, "tensor '" + name + "': shape " + shape_string(t.shape) + " of " + t.dtype +
                        " needs " + std::to_string(bytes) + " bytes but data_offsets span " +
                        std::to_string(t.end - t.begin));
    info.tensors.push_back(std::move(t));
  }

  // The tensors must tile [0, data_size) exactly (the reference implementation's rule).
  std::vector<const SafetensorsTensor*> order;
  for (const SafetensorsTensor& t : info.tensors) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](const SafetensorsTensor* a, const SafetensorsTensor* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t expected = 0;
  for (const SafetensorsTensor* t : order) {
    if (t->begin < expected)
      corrupt(path, "tensor '" + t->name + "': data_offsets [" + std::to_string(t->begin) + ", " +
                        std::to_string(t->end) + ") overlap the previous tensor (which ends at " +
                        std::to_string(expected) + ")");
    if (t->begin > expected)
      corrupt(path, "tensor '" + t->name + "': data_offsets begin " + std::to_string(t->begin) +
                        " leaves a gap after byte " + std::to_string(expected));
    if (t->end > data_size)
      corrupt(path, "tensor '" + t->name + "': data_offsets end " + std::to_string(t->end) +
                        " is past the end of the data section (" + std::to_string(data_size) +
                        " bytes; truncated file?)");
    expected = t->end;
  }
  if (expected != data_size)
    corrupt(path, "the data section has " + std::to_string(data_size - expected) +
                      " bytes after the last tensor");
  return info;
}

// ================================ safetensors writer =====================================

struct WriteEntry {
  std::string name;
  std::vector<int64_t> shape;  // as written
  const float* data;
  // When set, `data` is [shape[1], shape[0]] in memory and is written transposed.
  bool transpose;
};

void write_safetensors_impl(const std::string& path, const std::vector<WriteEntry>& entries) {
  using json::Value;
  Value header = Value::object();
  Value meta = Value::object();
  meta.set("format", Value::string("pt"));
  header.set("__metadata__", std::move(meta));
  std::unordered_set<std::string> seen;
  uint64_t offset = 0;
  std::vector<int64_t> numels;
  for (const WriteEntry& e : entries) {
    require(!e.name.empty() && e.name != "__metadata__", ErrorCode::InvalidArgument,
            path + ": invalid tensor name '" + e.name + "'", "tensors");
    require(seen.insert(e.name).second, ErrorCode::InvalidArgument,
            path + ": tensor name '" + e.name + "' given twice", e.name);
    try {
      (void)json::dump(Value::string(e.name));
    } catch (const Error&) {
      throw Error(ErrorCode::InvalidArgument,
                  path + ": tensor name '" + e.name + "' is not valid UTF-8", e.name);
    }
    require(!e.transpose || e.shape.size() == 2, ErrorCode::Internal,
            "a transposed tensor must be 2-D", e.name);
    int64_t numel = 1;
    Value shape = Value::array();
    for (int64_t d : e.shape) {
      require(d >= 0, ErrorCode::InvalidArgument,
              path + ": tensor '" + e.name + "' has a negative dimension", e.name);
      require(d == 0 || numel <= std::numeric_limits<int64_t>::max() / 4 / d,
              ErrorCode::InvalidArgument, path + ": tensor '" + e.name + "' is too large", e.name);
      numel *= d;
      shape.push_back(Value::integer(d));
    }
    require(numel == 0 || e.data != nullptr, ErrorCode::InvalidArgument,
            path + ": tensor '" + e.name + "' has no data (null pointer)", e.name);
    Value offsets = Value::array();
    offsets.push_back(Value::integer(static_cast<int64_t>(offset)));
    offset += static_cast<uint64_t>(numel) * 4;
    offsets.push_back(Value::integer(static_cast<int64_t>(offset)));
    Value info = Value::object();
    info.set("dtype", Value::string("F32"));
    info.set("shape", std::move(shape));
    info.set("data_offsets", std::move(offsets));
    header.set(e.name, std::move(info));
    numels.push_back(numel);
  }
  std::string text = json::dump(header);
  // Pad with spaces so the data section starts 8-byte aligned (as the reference does).
  text.append((8 - text.size() % 8) % 8, ' ');
  unsigned char len_bytes[8];
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<unsigned char>(text.size() >> (8 * i));

  AtomicWriter out(path);
  out.write(len_bytes, 8);
  out.write(text.data(), text.size());
  std::vector<float> scratch;
  for (size_t k = 0; k < entries.size(); ++k) {
    const WriteEntry& e = entries[k];
    const int64_t numel = numels[k];
    if (numel == 0) continue;
    if (e.transpose) {
      // Memory holds [shape[1], shape[0]]; the file gets [shape[0], shape[1]].
      scratch.resize(static_cast<size_t>(numel));
      transpose(e.data, e.shape[1], e.shape[0], scratch.data());
      out.write(scratch.data(), static_cast<size_t>(numel) * 4);
    } else {
      out.write(e.data, static_cast<size_t>(numel) * 4);
    }
  }
  out.commit();
}

void write_text_atomic(const std::string& path, const std::string& text) {
  AtomicWriter out(path);
  out.write(text.data(), text.size());
  out.commit();
}

// ================================ GPT-2 names ============================================

// What a tensor name found in a file stands for.
struct Classified {
  enum Kind { Param, LmHead, Ignored, Unknown } kind = Unknown;
  std::string canonical;  // Param: the ParameterLayout name
  int64_t layer = -1;     // Param in a block: its index (possibly >= n_layer)
};

// "<head><digits>.<rest>" -> (layer, rest), head "h." for GPT-2 and "model.layers." for
// Llama; false otherwise. Leading zeros and absurd lengths are not a block name.
bool split_block_name(const std::string& s, int64_t& layer, std::string& rest, const char* head = "h.") {
  const size_t h = std::strlen(head);
  if (s.compare(0, h, head) != 0) return false;
  size_t i = h;
  while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i;
  const size_t digits = i - h;
  if (digits == 0 || digits > 9 || (digits > 1 && s[h] == '0')) return false;
  if (i >= s.size() || s[i] != '.') return false;
  layer = std::stoll(s.substr(h, digits));
  rest = s.substr(i + 1);
  return true;
}

// A Llama checkpoint's tensors (Hugging Face's LlamaForCausalLM names, kept as they are).
Classified classify_llama(const std::string& name, const ModelConfig& config) {
  static const std::unordered_set<std::string> block_suffixes = {
      "input_layernorm.weight",  "self_attn.q_proj.weight", "self_attn.k_proj.weight",
      "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
      "mlp.gate_proj.weight",    "mlp.up_proj.weight",      "mlp.down_proj.weight"};
  Classified c;
  if (name == "score.weight" || name == "model.embed_tokens.weight" || name == "model.norm.weight") {
    c.kind = Classified::Param;
    c.canonical = name;
    return c;
  }
  if (name == "lm_head.weight") {
    if (config.untied_head()) {
      c.kind = Classified::Param;
      c.canonical = name;
    } else {
      c.kind = Classified::LmHead;  // a copy of the tied embedding: checked equal, not loaded
    }
    return c;
  }
  int64_t layer = -1;
  std::string rest;
  if (split_block_name(name, layer, rest, "model.layers.")) {
    if (rest == "self_attn.rotary_emb.inv_freq") {
      c.kind = Classified::Ignored;  // a buffer of old checkpoints, recomputed from rope_theta
      return c;
    }
    if (block_suffixes.count(rest) > 0) {
      c.kind = Classified::Param;
      c.canonical = name;
      c.layer = layer;
    }
  }
  return c;  // Unknown
}

bool is_block_suffix(const std::string& rest) {
  static const std::unordered_set<std::string> suffixes = {
      "ln_1.weight",        "ln_1.bias",          "attn.c_attn.weight", "attn.c_attn.bias",
      "attn.c_proj.weight", "attn.c_proj.bias",   "ln_2.weight",        "ln_2.bias",
      "mlp.c_fc.weight",    "mlp.c_fc.bias",      "mlp.c_proj.weight",  "mlp.c_proj.bias"};
  return suffixes.count(rest) > 0;
}

Classified classify(const std::string& name) {
  Classified c;
  if (name == "score.weight") {  // the value head lives at the top level only
    c.kind = Classified::Param;
    c.canonical = name;
    return c;
  }
  if (name == "lm_head.weight") {
    c.kind = Classified::LmHead;
    return c;
  }
  const std::string s =
      name.compare(0, std::strlen(kPrefix), kPrefix) == 0 ? name.substr(std::strlen(kPrefix)) : name;
  if (s == "wte.weight" || s == "wpe.weight" || s == "ln_f.weight" || s == "ln_f.bias") {
    c.kind = Classified::Param;
    c.canonical = s;
    return c;
  }
  int64_t layer = -1;
  std::string rest;
  if (split_block_name(s, layer, rest)) {
    if (rest == "attn.bias" || rest == "attn.masked_bias") {
      c.kind = Classified::Ignored;  // causal-mask buffers of old checkpoints
      return c;
    }
    if (is_block_suffix(rest)) {
      c.kind = Classified::Param;
      c.canonical = s;
      c.layer = layer;
      return c;
    }
  }
  return c;  // Unknown
}

// ================================ loading ================================================

// A JSON file that must hold an object: anything else is CorruptFile naming the file.
json::Value parse_json_file(const std::string& text, const std::string& path) {
  json::Value v;
  try {
    v = json::parse(text, path);
  } catch (const Error& e) {
    if (e.code() != ErrorCode::InvalidArgument) throw;
    throw Error(ErrorCode::CorruptFile, std::string("corrupt JSON file: ") + e.what(), path);
  }
  if (!v.is_object())
    throw Error(ErrorCode::CorruptFile,
                path + ": corrupt JSON file: expected an object, got " + json::type_name(v.type()),
                path);
  return v;
}

struct WeightFile {
  std::string path;
  File file;
  HeaderInfo header;
};

struct Located {
  size_t file = 0;                        // index into the WeightFile list
  const SafetensorsTensor* tensor = nullptr;
};

// Reads tensor `src` of `file`, converts it to float32 and stores it at dst (numel
// floats), transposing a 2-D on-disk [R, C] into [C, R] when `transpose_2d`.
void read_tensor(const WeightFile& file, const SafetensorsTensor& src, bool transpose_2d,
                 float* dst, int64_t numel, std::vector<unsigned char>& raw,
                 std::vector<float>& tmp) {
  const uint64_t esize = dtype_size(src.dtype);
  const uint64_t bytes = static_cast<uint64_t>(numel) * esize;
  const uint64_t offset = file.header.data_start + src.begin;
  float* conv = dst;
  if (transpose_2d) {
    tmp.resize(static_cast<size_t>(numel));
    conv = tmp.data();
  }
  if (src.dtype == "F32") {
    read_exact(file.file.get(), conv, bytes, offset, file.path);
  } else {
    raw.resize(static_cast<size_t>(bytes));
    read_exact(file.file.get(), raw.data(), bytes, offset, file.path);
    const unsigned char* r = raw.data();
    const std::string& dt = src.dtype;
    parallel_for(numel, [&](int64_t b, int64_t e) {
      if (dt == "F16") {
        for (int64_t i = b; i < e; ++i) {
          uint16_t h;
          std::memcpy(&h, r + 2 * i, 2);
          conv[i] = f16_to_float(h);
        }
      } else if (dt == "BF16") {
        for (int64_t i = b; i < e; ++i) {
          uint16_t h;
          std::memcpy(&h, r + 2 * i, 2);
          conv[i] = bf16_to_float(h);
        }
      } else {  // F64 (the caller admits only float dtypes)
        for (int64_t i = b; i < e; ++i) {
          double d;
          std::memcpy(&d, r + 8 * i, 8);
          conv[i] = f64_to_float(d);
        }
      }
    }, grain_for(4));
  }
  if (transpose_2d) transpose(conv, src.shape[0], src.shape[1], dst);
}

void check_finite(const float* x, int64_t numel, const std::string& path, const std::string& name) {
  const int64_t bad = first_non_finite(x, numel);
  if (bad >= 0)
    throw Error(ErrorCode::NonFinite,
                path + ": tensor '" + name + "' holds a non-finite value (" +
                    std::to_string(x[bad]) + " at flat index " + std::to_string(bad) +
                    ", after conversion to float32)",
                name);
}

// Allocation failures (a huge model, a hostile header) surface as ppo::Error, like
// every other failure of the core.
template <typename F>
auto oom_as_error(const std::string& what, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    throw Error(ErrorCode::OutOfMemory, what + ": out of host memory", what);
  } catch (const std::length_error&) {
    throw Error(ErrorCode::OutOfMemory, what + ": an allocation exceeds the addressable size", what);
  }
}

}  // namespace

// ================================ public API =============================================

std::vector<SafetensorsTensor> read_safetensors_header(const std::string& path) {
  return oom_as_error(path, [&] {
    uint64_t size = 0;
    File f = open_for_reading(path, size);
    return parse_header(f.get(), size, path).tensors;
  });
}

std::vector<float> read_safetensors_f32(const std::string& path, const std::string& name,
                                        const std::vector<int64_t>& shape) {
  return oom_as_error(path, [&] {
    uint64_t size = 0;
    File f = open_for_reading(path, size);
    const HeaderInfo h = parse_header(f.get(), size, path);
    for (const SafetensorsTensor& t : h.tensors) {
      if (t.name != name) continue;
      require(t.dtype == "F32", ErrorCode::InvalidArgument,
              path + ": tensor " + name + " is " + t.dtype + ", expected F32", name);
      require(t.shape == shape, ErrorCode::ShapeMismatch,
              path + ": tensor " + name + " has shape " + shape_string(t.shape) + ", expected " +
                  shape_string(shape),
              name);
      int64_t n = 1;
      for (int64_t d : shape) n *= d;
      std::vector<float> out(static_cast<size_t>(n));
      read_exact(f.get(), out.data(), t.end - t.begin, h.data_start + t.begin, path);
      for (int64_t i = 0; i < n; ++i)
        require(std::isfinite(out[i]), ErrorCode::NonFinite,
                path + ": tensor " + name + " holds NaN or infinity at " + std::to_string(i), name);
      return out;
    }
    throw Error(ErrorCode::InvalidArgument, path + ": no tensor named " + name, name);
  });
}

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors) {
  oom_as_error(path, [&] {
    std::vector<WriteEntry> entries;
    entries.reserve(tensors.size());
    for (const TensorToWrite& t : tensors) entries.push_back({t.name, t.shape, t.data, false});
    write_safetensors_impl(path, entries);
  });
}

namespace {

LoadedCheckpoint load_checkpoint_impl(const std::string& dir) {
  require(!dir.empty(), ErrorCode::InvalidArgument, "checkpoint directory must not be empty", "dir");
  if (!is_directory(dir))
    throw Error(ErrorCode::NotFound,
                dir + ": " + (exists(dir) ? "not a directory" : "no such checkpoint directory"),
                dir);
  const std::string config_path = join_path(dir, kConfigFile);
  const std::string config_text = read_text_file(config_path);
  // Text that is not a JSON object is a corrupt file; a JSON object with bad fields is
  // a bad config (config_from_json: InvalidArgument naming the field).
  parse_json_file(config_text, config_path);
  ModelConfig config = config_from_json(config_text, config_path);

  // ---- the weight files: model.safetensors first (as transformers does), else shards.
  std::vector<WeightFile> files;
  std::vector<std::pair<std::string, std::string>> index_map;  // (tensor, shard file)
  const std::string single = join_path(dir, kWeightsFile);
  const std::string index_path = join_path(dir, kIndexFile);
  auto open_weights = [&](const std::string& path) {
    WeightFile w;
    w.path = path;
    uint64_t size = 0;
    w.file = open_for_reading(path, size);
    w.header = parse_header(w.file.get(), size, path);
    files.push_back(std::move(w));
  };
  if (exists(single)) {
    open_weights(single);
  } else if (exists(index_path)) {
    const json::Value index = parse_json_file(read_text_file(index_path), index_path);
    const json::Value* map = index.find("weight_map");
    require(map && map->is_object(), ErrorCode::CorruptFile,
            index_path + ": expected an object with a \"weight_map\" object", index_path);
    std::unordered_map<std::string, size_t> shard_ids;
    for (size_t k = 0; k < map->size(); ++k) {
      const json::Value& shard = map->values()[k];
      require(shard.is_string(), ErrorCode::CorruptFile,
              index_path + ": weight_map[\"" + map->keys()[k] + "\"] must be a file name",
              index_path);
      const std::string& name = shard.as_string();
      // Shards live next to the index: no paths (nothing outside the directory is read).
      require(!name.empty() && name.find('/') == std::string::npos &&
                  name.find('\\') == std::string::npos && name != "." && name != "..",
              ErrorCode::CorruptFile,
              index_path + ": shard name \"" + name + "\" must be a plain file name", index_path);
      if (shard_ids.emplace(name, shard_ids.size()).second) open_weights(join_path(dir, name));
      index_map.emplace_back(map->keys()[k], name);
    }
    require(!files.empty(), ErrorCode::CorruptFile,
            index_path + ": the weight_map names no shard", index_path);
  } else {
    throw Error(ErrorCode::NotFound,
                dir + ": no " + kWeightsFile + " (or " + kIndexFile +
                    ") in the checkpoint directory" +
                    (exists(join_path(dir, "pytorch_model.bin"))
                         ? " (pytorch_model.bin is not read: convert it to safetensors)"
                         : ""),
                single);
  }

  // Every tensor the index lists must be in the shard it names.
  {
    std::unordered_set<std::string> present;  // "<shard path>\n<tensor name>"
    for (const WeightFile& w : files)
      for (const SafetensorsTensor& t : w.header.tensors) present.insert(w.path + '\n' + t.name);
    for (const auto& [tensor, shard] : index_map)
      if (present.count(join_path(dir, shard) + '\n' + tensor) == 0)
        throw Error(ErrorCode::InvalidArgument,
                    index_path + ": lists tensor '" + tensor + "' in " + shard +
                        ", which does not contain it",
                    tensor);
  }

  // ---- classify every tensor of every file.
  std::unordered_map<std::string, Located> params;  // canonical name -> where
  Located lm_head;
  bool has_lm_head = false;
  int64_t max_layer = -1;
  for (size_t f = 0; f < files.size(); ++f) {
    for (const SafetensorsTensor& t : files[f].header.tensors) {
      const Classified c = config.is_llama() ? classify_llama(t.name, config) : classify(t.name);
      switch (c.kind) {
        case Classified::Unknown:
          throw Error(ErrorCode::InvalidArgument,
                      files[f].path + ": unexpected tensor '" + t.name + "': not part of a " +
                          (config.is_llama() ? "Llama" : "GPT-2") +
                          " model (a checkpoint of another architecture?)",
                      t.name);
        case Classified::Ignored: break;
        case Classified::LmHead:
          require(!has_lm_head, ErrorCode::InvalidArgument,
                  files[f].path + ": tensor '" + t.name + "' appears twice", t.name);
          has_lm_head = true;
          lm_head = {f, &t};
          break;
        case Classified::Param: {
          const auto inserted = params.emplace(c.canonical, Located{f, &t});
          require(inserted.second, ErrorCode::InvalidArgument,
                  files[f].path + ": tensor '" + t.name + "' appears twice (as '" +
                      inserted.first->second.tensor->name + "' in " +
                      files[inserted.first->second.file].path + ")",
                  t.name);
          max_layer = std::max(max_layer, c.layer);
          break;
        }
      }
    }
  }

  // ---- the config against the tensors.
  const bool has_score = params.count("score.weight") > 0;
  require(has_score || !config.value_head, ErrorCode::InvalidArgument,
          config_path + ": ppo_max_value_head is true but the weights have no 'score.weight'",
          "score.weight");
  config.value_head = has_score;
  require(max_layer + 1 == config.n_layer, ErrorCode::ShapeMismatch,
          config_path + ": n_layer = " + std::to_string(config.n_layer) + " but the weights have " +
              std::to_string(max_layer + 1) + " blocks",
          "n_layer");
  const ParameterLayout layout = parameter_layout(config);
  for (const ParamTensor& p : layout.tensors)
    require(params.count(p.name) > 0, ErrorCode::InvalidArgument,
            dir + ": the weights have no tensor '" + p.name + "'" +
                (config.is_llama() ? std::string() : std::string(" (with or without the '") + kPrefix + "' prefix)"),
            p.name);
  // wte [V, C] and wpe [P, C] tell which config field disagrees.
  auto check_embedding = [&](const char* name, const char* rows_field, int64_t rows) {
    const SafetensorsTensor& t = *params.at(name).tensor;
    if (t.shape.size() != 2) return;  // reported by the shape check below
    require(t.shape[1] == config.n_embd, ErrorCode::ShapeMismatch,
            config_path + ": n_embd = " + std::to_string(config.n_embd) + " but '" + t.name +
                "' has shape " + shape_string(t.shape),
            "n_embd");
    require(t.shape[0] == rows, ErrorCode::ShapeMismatch,
            config_path + ": " + rows_field + " = " + std::to_string(rows) + " but '" + t.name +
                "' has shape " + shape_string(t.shape),
            rows_field);
  };
  const char* const embedding_name = config.is_llama() ? "model.embed_tokens.weight" : "wte.weight";
  check_embedding(embedding_name, "vocab_size", config.vocab_size);
  if (!config.is_llama()) check_embedding("wpe.weight", "n_positions", config.n_positions);

  // ---- shapes and dtypes.
  auto disk_shape = [](const ParamTensor& p) {
    return p.hf_transposed ? std::vector<int64_t>{p.shape[1], p.shape[0]} : p.shape;
  };
  for (const ParamTensor& p : layout.tensors) {
    const Located& loc = params.at(p.name);
    const SafetensorsTensor& t = *loc.tensor;
    const std::vector<int64_t> want = disk_shape(p);
    require(t.shape == want, ErrorCode::ShapeMismatch,
            files[loc.file].path + ": tensor '" + t.name + "' has shape " + shape_string(t.shape) +
                ", expected " + shape_string(want) +
                (p.name == "score.weight" ? " (a value head has exactly one output)" : ""),
            t.name);
    require(is_float_dtype(t.dtype), ErrorCode::InvalidArgument,
            files[loc.file].path + ": tensor '" + t.name + "' has dtype " + t.dtype +
                ", which is not supported (F32, F16, BF16 and F64 are)",
            t.name);
  }
  if (has_lm_head) {
    const SafetensorsTensor& t = *lm_head.tensor;
    const std::vector<int64_t> want = {config.vocab_size, config.n_embd};
    require(t.shape == want, ErrorCode::ShapeMismatch,
            files[lm_head.file].path + ": tensor '" + t.name + "' has shape " +
                shape_string(t.shape) + ", expected " + shape_string(want) + " (tied to " + embedding_name + ")",
            t.name);
    require(is_float_dtype(t.dtype), ErrorCode::InvalidArgument,
            files[lm_head.file].path + ": tensor '" + t.name + "' has dtype " + t.dtype +
                ", which is not supported (F32, F16, BF16 and F64 are)",
            t.name);
  }

  // ---- the data.
  LoadedCheckpoint out;
  out.params.resize(static_cast<size_t>(layout.total));
  std::vector<unsigned char> raw;
  std::vector<float> tmp;
  for (const ParamTensor& p : layout.tensors) {
    const Located& loc = params.at(p.name);
    float* dst = out.params.data() + p.offset;
    read_tensor(files[loc.file], *loc.tensor, p.hf_transposed, dst, p.numel, raw, tmp);
    check_finite(dst, p.numel, files[loc.file].path, loc.tensor->name);
  }
  if (has_lm_head) {
    const int64_t n = config.vocab_size * config.n_embd;
    std::vector<float> head(static_cast<size_t>(n));
    read_tensor(files[lm_head.file], *lm_head.tensor, false, head.data(), n, raw, tmp);
    check_finite(head.data(), n, files[lm_head.file].path, lm_head.tensor->name);
    const float* wte = out.params.data() + layout.wte;
    for (int64_t i = 0; i < n; ++i)
      if (head[static_cast<size_t>(i)] != wte[i])
        throw Error(ErrorCode::InvalidArgument,
                    files[lm_head.file].path + ": '" + lm_head.tensor->name + "' differs from " +
                        embedding_name + " (first at flat index " + std::to_string(i) +
                        (config.is_llama()
                             ? "), but config.json says tie_word_embeddings: true"
                             : "): an untied LM head is not supported for GPT-2 (the head is always wte)"),
                    lm_head.tensor->name);
  }
  out.config = config;
  return out;
}

void save_checkpoint_impl(const std::string& dir, const ModelConfig& config, const float* params) {
  config.validate();
  require(params != nullptr, ErrorCode::InvalidArgument, "params must not be null", "params");
  const ParameterLayout layout = parameter_layout(config);
  // A checkpoint load_checkpoint would refuse is not written (and nothing is replaced).
  for (const ParamTensor& p : layout.tensors) {
    const int64_t bad = first_non_finite(params + p.offset, p.numel);
    require(bad < 0, ErrorCode::NonFinite,
            "save_checkpoint: parameter tensor '" + p.name + "' holds a non-finite value at index " +
                std::to_string(bad),
            p.name);
  }
  std::vector<WriteEntry> entries;
  for (const ParamTensor& p : layout.tensors) {
    WriteEntry e;
    e.name = p.name == "score.weight" || config.is_llama() ? p.name : kPrefix + p.name;
    e.shape = p.hf_transposed ? std::vector<int64_t>{p.shape[1], p.shape[0]} : p.shape;
    e.data = params + p.offset;
    e.transpose = p.hf_transposed;
    entries.push_back(std::move(e));
  }
  make_directories(dir);
  // Weights first, then the config: config.json describes the model in the directory.
  write_safetensors_impl(join_path(dir, kWeightsFile), entries);
  write_text_atomic(join_path(dir, kConfigFile), config_to_json(config));
}

}  // namespace

LoadedCheckpoint load_checkpoint(const std::string& dir) {
  return oom_as_error(dir, [&] { return load_checkpoint_impl(dir); });
}

void save_checkpoint(const std::string& dir, const ModelConfig& config, const float* params) {
  oom_as_error(dir, [&] { save_checkpoint_impl(dir, config, params); });
}

}  // namespace ppo::model
