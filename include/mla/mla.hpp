// Everything a caller needs: #include <mla/mla.hpp>.
#pragma once

#include "mla/attention.hpp"
#include "mla/cache.hpp"
#include "mla/config.hpp"
#include "mla/dtype.hpp"
#include "mla/error.hpp"
#include "mla/safetensors.hpp"
#include "mla/weights.hpp"
#include "mla/run.hpp"
#include "mla/ops.hpp"
#include "mla/train.hpp"
