#include <gtest/gtest.h>
TEST(Placeholderattention, Builds) {}
