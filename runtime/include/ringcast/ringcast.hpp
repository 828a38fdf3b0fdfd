// The public C++ API of ringcast: include this one header.
// Session (communicator, device, stream), DeviceBuffer, tensor views, errors and the logger, the
// distributed attention operator with its options and plan, the decoder model and its datasets.
#pragma once

#include <ringcast/attention.hpp>
#include <ringcast/attention_options.hpp>
#include <ringcast/data.hpp>
#include <ringcast/error.hpp>
#include <ringcast/log.hpp>
#include <ringcast/memory.hpp>
#include <ringcast/model.hpp>
#include <ringcast/plan.hpp>
#include <ringcast/session.hpp>
#include <ringcast/tensor.hpp>
#include <ringcast/version.hpp>
