#include <gtest/gtest.h>
TEST(Placeholderconfig, Builds) {}
